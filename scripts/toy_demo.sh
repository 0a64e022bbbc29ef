#!/usr/bin/env bash
# scripts/toy_demo.sh: the main job. Sets up the environment, then runs on the bundled toy task the comparison that
# scripts/compare.sh runs on Multi30k: trains a softmax and a ReLA-g Transformer on CPU, decodes the test set, and
# prints one table (SacreBLEU, chrF, significance, speed, sparsity, null rate, head diversity and word-alignment
# AER against the toy task's gold alignments), with plots. QUICK=1 for a smoke run of a few minutes.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,5p' "$0" | sed 's/^# //'; exit 0; fi
venv="$(setup_env 3.11)"  # a plain assignment, so that a failed setup stops here
export RELA_PYTHON="$venv/bin/python"
run_pipeline compare toy softmax rela_g
