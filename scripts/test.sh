#!/usr/bin/env bash
# scripts/test.sh [--py 3.11|3.10] [pytest options...]: set up the environments and run the test suite under
# Python 3.11 with fairseq-fixed 0.12.3.1 and under Python 3.10 with fairseq 0.12.2; fails if either fails.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
versions=(3.11 3.10)
if [[ ${1:-} == --py ]]; then versions=("$2"); shift 2; fi
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,3p' "$0" | sed 's/^# //'; exit 0; fi
unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD  # the tests exercise the checkpoint allow-list, never the global switch
failed=()
for version in "${versions[@]}"; do
  if ! venv="$(setup_env "$version")"; then failed+=("$version (setup)"); continue; fi
  log "running the tests on Python $version"
  if ! (cd "$REPO_ROOT" && "$venv/bin/python" -m pytest "$@"); then failed+=("$version"); fi
done
if (( ${#failed[@]} )); then die "tests failed on Python ${failed[*]}"; fi
log "all tests passed on Python ${versions[*]}"
