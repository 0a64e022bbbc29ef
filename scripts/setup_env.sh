#!/usr/bin/env bash
# scripts/setup_env.sh [3.11|3.10]: create or update the project's environment for that Python (default 3.11):
# .venv-py311 (fairseq-fixed 0.12.3.1) or .venv-py310 (fairseq 0.12.2). Prints its folder.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
case "${1:-3.11}" in
  -h|--help) sed -n '2,3p' "$0" | sed 's/^# //'; exit 0 ;;
  3.11|3.10) setup_env "${1:-3.11}" ;;
  *) die "unknown Python version '$1'; choose 3.11 (fairseq-fixed) or 3.10 (fairseq 0.12.2)" ;;
esac
