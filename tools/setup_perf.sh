#!/usr/bin/env bash
# perf_analyzer for `make perf` (shared/DESIGN.md section 4): the real binary ships in the
# tritonclient==2.50.0 manylinux wheel; it lives in its own virtual environment (build/perf-venv)
# because the gateway pins another tritonclient. It needs Debian's libb64-0d and libcudart.so.12
# (PyPI nvidia-cuda-runtime-cu12; bench/perf.py puts its lib/ on LD_LIBRARY_PATH), also on CPU.
# Idempotent: a second run only checks.
set -euo pipefail
VENV=${PERF_VENV:-build/perf-venv}
PYTHON=${PYTHON:-python3}
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y libb64-0d || { $SUDO apt-get update && $SUDO apt-get install -y libb64-0d; }
fi
if [ ! -x "$VENV/bin/perf_analyzer" ] || [ ! -f "$VENV/.installed" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "tritonclient[grpc]==2.50.0" nvidia-cuda-runtime-cu12
  touch "$VENV/.installed"
fi
CUDART=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cuda_runtime/lib 2>/dev/null | head -1)
LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$VENV/bin/perf_analyzer" --version >/dev/null 2>&1 \
  || LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$VENV/bin/perf_analyzer" --help >/dev/null
echo "perf_analyzer ready: $VENV/bin/perf_analyzer (libcudart from $CUDART)"
