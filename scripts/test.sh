#!/usr/bin/env bash
# scripts/test.sh [--py 3.11|3.10] [--tier unit|integration|pipeline|support] [pytest options...]: set up the
# environments, lint with ruff, type-check with mypy, and run the test suite (or one tier of it, tests/TIER) under
# Python 3.11 with fairseq-fixed 0.12.3.1 and under Python 3.10 with fairseq 0.12.2, side by side; fails if any fails.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TIERS=(unit integration pipeline support)  # tests/unit: math, kernels, settings; integration: fairseq's tools through
# --user-dir; pipeline: the scripts, data, tune and compare; support: the suite's servers and helpers
versions=(3.11 3.10)
paths=()
while (( $# )); do
  case $1 in
    --py) [[ ${2:-} == 3.11 || ${2:-} == 3.10 ]] || die "--py: got '${2:-}', accepted: 3.11, 3.10"
          versions=("$2"); shift 2 ;;
    --tier) [[ " ${TIERS[*]} " == *" ${2:-} "* ]] || die "--tier: got '${2:-}', accepted: ${TIERS[*]}"
            paths+=("tests/$2"); shift 2 ;;
    -h|--help) sed -n '2,4p' "$0" | sed 's/^# //'; exit 0 ;;
    *) break ;;
  esac
done
unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD  # the tests exercise the checkpoint allow-list, never the global switch

failed=()
declare -A venvs setups
# the environments are set up side by side where flock can make their editable installs take turns (setup_env)
parallel=; if command -v flock >/dev/null 2>&1; then parallel=1; fi
folder="$(mktemp -d)"; trap 'rm -rf "$folder"' EXIT
for version in "${versions[@]}"; do
  if [[ -n $parallel ]]; then
    setup_env "$version" > "$folder/$version" & setups[$version]=$!
  elif setup_env "$version" > "$folder/$version"; then venvs[$version]=$(cat "$folder/$version")
  else failed+=("$version (setup)"); fi
done
for version in "${!setups[@]}"; do
  if wait "${setups[$version]}"; then venvs[$version]=$(cat "$folder/$version"); else failed+=("$version (setup)"); fi
done

if [[ -z ${venvs[3.11]:-${venvs[3.10]:-}} ]]; then die "failed: ${failed[*]}"; fi  # no environment to test in
log "ruff (lint and import order)"
(cd "$REPO_ROOT" && "${venvs[3.11]:-${venvs[3.10]}}/bin/ruff" check .) || failed+=("ruff")
log "mypy (type checking: rela_fairseq, rela_tools and benchmarks, mypy.ini)"
(cd "$REPO_ROOT" && "${venvs[3.11]:-${venvs[3.10]}}/bin/mypy") || failed+=("mypy")

# the suites run side by side: much of their time is single-threaded (starting fairseq's command-line tools). Each
# gets its share of the cores for torch's thread pools: two legs' pools on the same cores thrash (test_cli.py on
# 2 cores: 272 s with a pool of 2 per process, 124 s with 1). OMP_NUM_THREADS set by the caller wins.
threads=$(( $(nproc) / ${#venvs[@]} )); if (( threads < 1 )); then threads=1; fi
declare -A pids
for version in "${!venvs[@]}"; do
  log "running the tests on Python $version"
  (
    cd "$REPO_ROOT"
    # what does not depend on fairseq's version (pytest.ini, marker one_python) runs once: tests/conftest.py shares it
    # between the two legs when both run (ONE_PYTHON_UNDER_310), and runs all of it in a single leg
    leg=; if (( ${#venvs[@]} > 1 )); then leg=$version; fi
    # the ReLA models run through the fused kernels under 3.11 and through the eager operators under 3.10: the suite
    # passes with both (tests/unit/test_kernels.py compares the two on each version whatever this says)
    kernel=fused; if [[ $version == 3.10 ]]; then kernel=eager; fi
    RELA_FAIRSEQ_KERNEL=${RELA_FAIRSEQ_KERNEL:-$kernel} OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} \
      RELA_TESTS_LEG=$leg "${venvs[$version]}/bin/python" -m pytest -p no:cacheprovider \
      "${paths[@]}" "$@" 2>&1 | sed -u "s/^/[py$version] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids[$version]=$!
done
for version in "${!pids[@]}"; do
  wait "${pids[$version]}" || failed+=("$version")
done
if (( ${#failed[@]} )); then die "failed: ${failed[*]}"; fi
log "all tests passed on Python ${versions[*]}"
