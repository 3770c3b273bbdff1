#!/usr/bin/env bash
# Builds the GPU targets here (sm_90a) and copies them with the Debian shared libraries they
# need into .devbin/ (git-ignored), for a GPU machine that has CUDA, NCCL and cuDNN but not
# Abseil or Gloo. Usage: scripts/gpu_bundle.sh target...
# NO_BUILD=1 BUILD_DIR=build copies from a build that already has the targets (e.g. the full
# build of scripts/build.sh, service included) instead of configuring and building build-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu}
export PATH="/usr/local/cuda/bin:$PATH"
if [ "${NO_BUILD:-0}" != 1 ]; then
  mkdir -p "$BUILD_DIR"
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_WITH_SERVICE=OFF \
    >"$BUILD_DIR/configure.log" 2>&1 || { cat "$BUILD_DIR/configure.log"; exit 1; }
  cmake --build "$BUILD_DIR" -j "${JOBS:-2}" --target "$@"
fi
rm -rf .devbin && mkdir -p .devbin/lib
for t in "$@"; do
  bin=$(find "$BUILD_DIR" -type f -name "$t" -perm -u+x | head -n1)
  [ -n "$bin" ] || { echo "no binary for $t"; exit 1; }
  cp "$bin" .devbin/
  strip "$(basename "$bin" | sed 's|^|.devbin/|')" 2>/dev/null || true
  # Libraries the GPU machine lacks: everything but libc/libstdc++ and the CUDA stack.
  ldd "$bin" | awk '/=> \//{print $3}' | grep -vE \
    'lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+)\.so|libcuda|libcudart|libnccl|libcudnn|libcublas|libnvrtc|libnvJitLink' \
    | xargs -r -I{} cp -L {} .devbin/lib/
done
cp bench/*.py .devbin/ 2>/dev/null || true
du -sh .devbin
