#!/usr/bin/env bash
# scripts/evaluate.sh TASK SYSTEM  (--help for details)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_pipeline evaluate "$@"
