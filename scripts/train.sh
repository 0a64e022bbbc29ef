#!/usr/bin/env bash
# scripts/train.sh TASK SYSTEM [fairseq-train options...]  (--help for details)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_pipeline train "$@"
