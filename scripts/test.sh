#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite (CI calls exactly this).
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_COMPILE_DISABLE=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests "$@"
