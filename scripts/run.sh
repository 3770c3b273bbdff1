#!/usr/bin/env bash
# Installs what is needed, builds, and runs the main job: the service with local workers
# (`ringattn serve`: a coordinator on localhost and 3 worker processes, CPU backend and a Gloo
# ring without a GPU) answering one sample request, checked against the fp64 reference, and
# printing the result and its timing breakdown. Extra flags go to `ringattn serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
./build/cli/ringattn serve --demo --listen=127.0.0.1:0 --metrics=127.0.0.1:0 --workers=3 \
  --seqlen=2048 --heads=8 --heads_k=2 --head_dim=128 --dtype=bf16 --causal "$@"
