#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit, integration (real NIXL) and
# end-to-end (real vLLM engines). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-browser.sh   # Debian chromium + playwright, for the status-page test
exec .venv/bin/python -m pytest -v --durations=15 "$@"
