#!/usr/bin/env bash
# Installs what is needed, builds, and runs every test. GPU tests (ctest label gpu) skip
# cleanly on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
cd build
ctest --output-on-failure -j "${JOBS:-$(nproc)}" --timeout 900
