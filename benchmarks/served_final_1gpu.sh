#!/usr/bin/env bash
# Issue 9 acceptance + the MPS P+D rows in one device call (benchmarks/RESULTS.md, commit 1d5d48a).
#   OUT=/tmp/out COMMIT=abc1234 bash benchmarks/served_final_1gpu.sh
set -u
# run from the repo root (or a clean `git archive` of it) with .whl and build/goodput_whl present
OUT=$OUT COMMIT=$COMMIT bash benchmarks/served_1gpu.sh 2>&1 | grep -v "requests done" | grep -E "^\[|^\|" 
source benchmarks/device_env.sh
timeout -k 10 150 python3 -m benchmarks.served --device cuda --no-inprocess --layouts pd --workloads W2,W3 \
  --kv-transfer-backend nixl --warmup 2 --pd-serve-args "--gpu-sharing mps" --request-timeout 120 \
  --startup-timeout 150 --commit $COMMIT --log-dir /tmp/sl-mps --json $OUT/pd_mps.json 2>&1 | grep -E "^\[pd\]|MPS|mps|Error" | head -20
