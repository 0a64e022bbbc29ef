#!/usr/bin/env bash
# scripts/results.sh [--output FILE]  (--help for details)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_pipeline results "$@"
