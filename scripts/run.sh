#!/usr/bin/env bash
# Installs what is needed, builds, and runs the main job: a forward ring across local CPU
# worker processes (Gloo over loopback), checked against a single-device run and the fp64
# reference, printing the result and its timings. Extra flags go to `ringattn ring`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
./build/client/ringattn ring --world=4 --seqlen=4096 --heads=8 --heads_k=2 --head_dim=128 \
  --dtype=bf16 --causal "$@"
