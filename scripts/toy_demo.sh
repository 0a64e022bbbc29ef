#!/usr/bin/env bash
# scripts/toy_demo.sh: the main job. Sets up the environment, then on the bundled toy task trains a softmax and a
# ReLA-g Transformer on CPU, decodes the test set, and prints SacreBLEU, chrF, sparsity, null rate, head diversity
# and word-alignment AER side by side, with plots. QUICK=1 for a one-minute smoke run.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,4p' "$0" | sed 's/^# //'; exit 0; fi
venv="$(setup_env 3.11)"  # a plain assignment, so that a failed setup stops here
export RELA_PYTHON="$venv/bin/python"
"$REPO_ROOT/scripts/reproduce.sh" toy softmax
"$REPO_ROOT/scripts/reproduce.sh" toy rela_g
run_pipeline toy-report
