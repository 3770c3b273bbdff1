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
  prometheus-cpp-dev libgloo-dev libgtest-dev libgmock-dev libbenchmark-dev libspdlog-dev
  python3 python3-pip python3-yaml curl
  prometheus  # promtool and the server: the deploy_monitoring test checks metrics, rules, queries
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

# PyYAML for the deploy tests, also where python3 is not Debian's (a pyenv one).
if ! python3 -c "import yaml" >/dev/null 2>&1; then
  echo "setup: installing PyYAML for $(command -v python3)"
  python3 -m pip install -q PyYAML || echo "setup: PyYAML unavailable; the deploy tests will fail"
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
# The Python client (python/, docs/python.md) and its tests: grpcio, protobuf, numpy, ml_dtypes,
# grpcio-tools (a protoc for the API descriptor) and torch (its autograd tests; from PyPI with
# its CUDA libraries: about 5 GB, under 2 minutes here) into .deps/pyclient. Without torch the
# torch tests skip, saying so.
PYCLIENT_TARGET=.deps/pyclient
PYCLIENT_PACKAGES=(grpcio==1.85.4 grpcio-tools==1.85.4 protobuf==7.36.2 numpy==2.4.6
                   ml_dtypes==0.7.0)
PYCLIENT_TORCH=(torch==2.15.0)
pyclient_want="${PYCLIENT_PACKAGES[*]} ${PYCLIENT_TORCH[*]}"
if [ ! -f "$PYCLIENT_TARGET/.installed" ] || [ "$(cat "$PYCLIENT_TARGET/.installed")" != "$pyclient_want" ]; then
  echo "setup: installing ${PYCLIENT_PACKAGES[*]} ${PYCLIENT_TORCH[*]} into $PYCLIENT_TARGET"
  export PIP_ROOT_USER_ACTION=ignore
  rm -rf "$PYCLIENT_TARGET.tmp"
  pyclient_got="$pyclient_want"
  if ! python3 -m pip install -q --target "$PYCLIENT_TARGET.tmp" "${PYCLIENT_PACKAGES[@]}" \
      "${PYCLIENT_TORCH[@]}"; then
    echo "setup: torch unavailable; the Python client's torch tests will skip"
    rm -rf "$PYCLIENT_TARGET.tmp"
    pyclient_got="${PYCLIENT_PACKAGES[*]}"
    python3 -m pip install -q --target "$PYCLIENT_TARGET.tmp" "${PYCLIENT_PACKAGES[@]}" \
      || { echo "setup: the Python client's packages are unavailable; its tests will fail"
           rm -rf "$PYCLIENT_TARGET.tmp"; pyclient_got=""; }
  fi
  if [ -n "$pyclient_got" ]; then
    rm -rf "$PYCLIENT_TARGET"
    mv "$PYCLIENT_TARGET.tmp" "$PYCLIENT_TARGET"
    echo "$pyclient_got" > "$PYCLIENT_TARGET/.installed"
  fi
fi
echo "setup: done"
