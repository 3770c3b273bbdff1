#!/usr/bin/env bash
# Installs everything ringattn needs to build and test, idempotently, on a fresh Debian
# machine: compilers and libraries from Debian's packages, and the header-only packages
# (cudnn-frontend, CUTLASS/CuTe) from PyPI into .deps/python. The CUDA toolkit, NCCL and
# cuDNN are used when the machine has them; without nvcc the CUDA backends are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libabsl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  prometheus-cpp-dev libgloo-dev libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-pip curl
)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Header packages for the GPU backends; only worth fetching where nvcc can use them.
PY_TARGET=.deps/python
PY_PACKAGES=(nvidia-cudnn-frontend==1.32.0 nvidia-cutlass==4.2.0.0)
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  if [ ! -f "$PY_TARGET/.installed" ] || [ "$(cat "$PY_TARGET/.installed")" != "${PY_PACKAGES[*]}" ]; then
    echo "setup: installing ${PY_PACKAGES[*]} into $PY_TARGET"
    python3 -m pip install -q --no-deps --target "$PY_TARGET" --upgrade "${PY_PACKAGES[@]}"
    echo "${PY_PACKAGES[*]}" > "$PY_TARGET/.installed"
  fi
fi
# Plots of the comparison report (bench/compare/report.py); it still writes Markdown and JSON
# without them.
PLOT_TARGET=.deps/plot
PLOT_PACKAGES=(matplotlib numpy contourpy cycler fonttools kiwisolver packaging pillow pyparsing
               python-dateutil six)
if ! PYTHONPATH="$PLOT_TARGET" python3 -c "import matplotlib" >/dev/null 2>&1; then
  echo "setup: installing ${PLOT_PACKAGES[*]} into $PLOT_TARGET"
  python3 -m pip install -q --no-deps --target "$PLOT_TARGET" "${PLOT_PACKAGES[@]}" \
    || echo "setup: plotting packages unavailable; reports will have no plots"
fi
echo "setup: done"
