#!/usr/bin/env bash
# The test suite on a CPU machine (what CI runs): sets up, then runs every CPU test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q tests "$@"
