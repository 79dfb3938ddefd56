#!/usr/bin/env bash
# Set up (if needed), check the import layering, and run the whole test suite: unit,
# integration (real NIXL) and end-to-end (real vLLM engines). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-debian.sh   # Debian chromium (+ playwright), tcpdump: tests need them
# The layering contracts (pyproject.toml, [tool.importlinter]): no import cycle, the data plane
# never imports the control plane but to start the agent, the agent and the controller never
# import each other.
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -v --durations=15 "$@"
