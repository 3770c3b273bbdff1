#!/usr/bin/env bash
# Fuzzes request validation and the chunk protocol with clang's libFuzzer (and ASAN/UBSAN):
# builds tests/fuzz's request_fuzzer in build-fuzz (no CUDA) and runs it for SECONDS (default
# 60) over a corpus in build-fuzz/corpus. CI replays the same target over seeded mutations
# instead (ctest request_fuzz_replay).   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
mkdir -p build-fuzz
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DRINGATTN_WITH_CUDA=OFF -DRINGATTN_FUZZ=ON \
  -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >build-fuzz/configure.log 2>&1 \
  || { cat build-fuzz/configure.log; exit 1; }
cmake --build build-fuzz -j "${JOBS:-2}" --target request_fuzzer
mkdir -p build-fuzz/corpus
build-fuzz/tests/fuzz/request_fuzzer -max_total_time="$SECONDS_TO_RUN" -max_len=4096 \
  build-fuzz/corpus
