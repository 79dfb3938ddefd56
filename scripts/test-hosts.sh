#!/usr/bin/env bash
# Make (up) or remove (down) N test hosts on this machine: network namespaces on a bridge,
# each process run there in a pid namespace of its own, so vllm-kvmove sees separate
# machines (see tests/harness/hosts.py). Needs root.
#   bash scripts/test-hosts.sh up 3      # prints each host's address and how to run on it
#   bash scripts/test-hosts.sh down 3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.harness.hosts "$@"
