#!/usr/bin/env bash
# Set up (if needed) and run the move demo: two vLLM engines, the controller, one KV move.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/move/run_demo.py "$@"
