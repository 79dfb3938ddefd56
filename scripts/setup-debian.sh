#!/usr/bin/env bash
# Debian packages the tests use, and playwright's Python driver. Idempotent.
#   chromium (+ a font)  the status-page test (tests/integration/test_status_page.py), driven
#                        by the Python package playwright in .venv
#   tcpdump              the wire-capture test across hosts (tests/e2e_hosts)
#   iperf3               the link baseline of benchmark P7 (benchmarks/p7_hosts.py)
#
# Never run `playwright install`: browser downloads are blocked on these machines. The test
# launches Debian's /usr/bin/chromium through playwright's executable_path instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVMOVE_VENV:-.venv}
CHROMIUM=/usr/bin/chromium  # Debian's; the test launches exactly this one

missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium fonts-dejavu-core)
command -v tcpdump >/dev/null || missing+=(tcpdump)
command -v iperf3 >/dev/null || missing+=(iperf3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup-debian] installing ${missing[*]} (about a minute)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No recommends (mesa, udev, printing...): a headless browser needs none; a font it does.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-debian] no $VENV: run scripts/setup.sh first" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "[setup-debian] installing playwright (the Python driver only)"
  "$VENV/bin/pip" install -q playwright==1.65.2 2>&1 | { grep -v -e "^WARNING: Location" || true; }
fi
echo "[setup-debian] ready: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"), $(tcpdump --version 2>&1 | head -1), playwright $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))')"
