#!/usr/bin/env bash
# Issue 14's acceptance, every figure from one device call (~9 minutes on a warm H200):
#   1. the kernel and greedy-equality GPU tests;
#   2. benchmarks.decode_profile at batch 256 x 640 (the MBU line, copy bandwidth of the same call);
#   3. benchmarks.served colocated W2, W3, W1: the in-process engine first (W1-W3 output tok/s,
#      mean TTFT), then `tandem serve --colocated` with default flags (the served ratio);
#   4. W4 in process (total tok/s).
# Engine defaults throughout; ENV (e.g. "TANDEM_DENSE_PREFILL=1") goes to every step.
#   OUT=/tmp/out COMMIT=abc1234 bash benchmarks/issue14_1gpu.sh   # carry ".whl", "build/goodput_whl"
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-unknown}
source benchmarks/device_env.sh
[ -n "${ENV:-}" ] && export $ENV
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
echo "== 1. GPU tests"
OMP_NUM_THREADS=2 timeout -k 10 240 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_shared_prefix_attention.py tests/test_triton_greedy_gpu.py > "$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"
echo "== 2. decode step profile"
timeout -k 10 120 python3 -m benchmarks.decode_profile --batch 256 --context 640 --out "$OUT/decode_profile.json" 2>&1 \
    | grep -E '"(replay_s|step_s|replay_mbu|step_mbu|copy_bw)"'
echo "== 3. served colocated vs in process (W2, W3, W1)"
timeout -k 30 330 python3 -m benchmarks.served --device cuda --layouts colocated --workloads W2,W3,W1 --warmup 2 \
    --inprocess-timeout 150 --request-timeout 100 --startup-timeout 120 --commit "$COMMIT" \
    --log-dir /tmp/served-logs --json "$OUT/served.json" --results-md "$OUT/served.md" 2>&1 \
    | grep -E "^\| colocated|rror"
echo "== 4. W4 in process"
timeout -k 10 150 python3 -m benchmarks.bench --device cuda --modes colocated --workloads W4 --commit "$COMMIT" \
    --date "$(date -u +%F)" --json "$OUT/w4.json" --log-dir /tmp/w4 2>&1 | grep -E "^\| colo|rror"
true
