#!/usr/bin/env bash
# Headless browser for the status-page test (tests/integration/test_status_page.py):
# Debian's chromium, driven by the Python package playwright in .venv. Idempotent.
#
# Never run `playwright install`: browser downloads are blocked on these machines. The test
# launches Debian's /usr/bin/chromium through playwright's executable_path instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVMOVE_VENV:-.venv}
CHROMIUM=/usr/bin/chromium  # Debian's; the test launches exactly this one

if [ ! -x "$CHROMIUM" ]; then
  echo "[setup-browser] installing Debian's chromium (about a minute)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No recommends (mesa, udev, printing...): a headless browser needs none; a font it does.
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-browser] no $VENV: run scripts/setup.sh first" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "[setup-browser] installing playwright (the Python driver only)"
  "$VENV/bin/pip" install -q playwright==1.65.2 2>&1 | { grep -v -e "^WARNING: Location" || true; }
fi
echo "[setup-browser] ready: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"), playwright $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))')"
