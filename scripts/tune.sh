#!/usr/bin/env bash
# scripts/tune.sh TASK [SYSTEM...] [--seeds N]  (--help for details)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_pipeline tune "$@"
