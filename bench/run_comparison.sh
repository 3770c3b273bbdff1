#!/usr/bin/env bash
# The comparison framework's one command (the seed's run_comparison_tests.sh): builds
# ringattn_compare if needed, runs a case set, and writes the report.
#
#   bench/run_comparison.sh                     preset "gpu" when nvidia-smi sees a GPU, else "ci"
#   bench/run_comparison.sh --preset quick      single-device check only
#   bench/run_comparison.sh --preset multigpu   rings over NCCL, a GPU per rank (W = 2, 4, 8 up
#                                               to the GPUs present); NCCL_NVLS_ENABLE=0 is set
#   bench/run_comparison.sh --out DIR -- --cases my_cases.txt --implementations single_cpu,ring_cpu
#
# Writes DIR (default out/comparison): results.jsonl and compare.log from the tool, then
# report.md, summary.json and the PNG plots from bench/compare/report.py (when python3 is there;
# plots need matplotlib). Exit status: non-zero when the tool or the report finds a tolerance
# breached or an implementation failing.
# Environment: BUILD_DIR (default build), JOBS (default 2), CMAKE_ARGS (extra configure flags for
# a new build directory, e.g. -DRINGATTN_WITH_CUDA=OFF), RINGATTN_COMPARE (a prebuilt
# ringattn_compare: no build), NCCL_NVLS_ENABLE (default 0 here: NVLink SHARP multicast buffers
# are set up at NCCL init on NVSwitch hosts, useless to a point-to-point ring and at times
# refused; see worker/ring/nccl_communicator.h).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

preset=""
out="out/comparison"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --preset=*) preset=${1#*=}; shift ;;
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [ -z "$preset" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    preset=gpu
  else
    preset=ci
  fi
fi

bin=${RINGATTN_COMPARE:-}
if [ -z "$bin" ]; then
  BUILD_DIR=${BUILD_DIR:-build}
  if [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
  if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
    generator=()
    if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
    mkdir -p "$BUILD_DIR"
    echo "configuring $BUILD_DIR (log: $BUILD_DIR/configure.log)"
    # shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
    cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DRINGATTN_WITH_SERVICE=OFF ${CMAKE_ARGS:-} >"$BUILD_DIR/configure.log" 2>&1 \
      || { cat "$BUILD_DIR/configure.log"; exit 1; }
  fi
  cmake --build "$BUILD_DIR" --target ringattn_compare -j "${JOBS:-2}"
  bin="$BUILD_DIR/bench/compare/ringattn_compare"
fi

mkdir -p "$out"
echo "running: $bin --preset $preset --out $out ${extra[*]:-}"
set +e
"$bin" --preset "$preset" --out "$out" "${extra[@]}" 2>&1 | tee "$out/compare.log"
tool_rc=${PIPESTATUS[0]}
set -e

report_rc=0
if [ -f "$out/results.jsonl" ] && command -v python3 >/dev/null 2>&1; then
  PYTHONPATH="$PWD/.deps/plot${PYTHONPATH:+:$PYTHONPATH}" python3 bench/compare/report.py "$out" \
    || report_rc=$?
elif [ -f "$out/results.jsonl" ]; then
  echo "python3 not found: no report.md (the tool's check above stands; results in $out)"
fi
if [ "$tool_rc" -ne 0 ]; then exit "$tool_rc"; fi
exit "$report_rc"
