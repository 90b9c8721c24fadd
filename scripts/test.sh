#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), lint (ruff, configured in pyproject.toml) and run the whole test
# suite, slow integration tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
exec .venv/bin/python -m pytest tests "$@"
