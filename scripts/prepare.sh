#!/usr/bin/env bash
# scripts/prepare.sh TASK  (--help for details)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_pipeline prepare "$@"
