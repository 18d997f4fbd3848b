#!/usr/bin/env bash
# Issue 5 on one GPU, in one device call: KV transfer bandwidth (grpc vs nixl, both
# processes on GPU 0), then the goodput search for `P+D sharing GPU 0` (nixl) and for
# `colocated x1`, same flags. Writes JSON and a markdown section per run under OUT.
#   OUT=/tmp/out [COMMIT=abc1234] bash benchmarks/goodput_1gpu.sh
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD)}   # the device's checkout may carry a stale .git
G="--device cuda --gpus 0 --duration 8 --start-rate 4 --max-rate 64 --min-rate 0.5 --search-steps 1 --commit $COMMIT"
timeout 60 python3 -m benchmarks.kv_transfer_bench --backends nixl --pages contiguous --recv-device cuda:0 \
    --send-device cuda:0 --tokens 1024,4096 --trials 5 --json "$OUT/kv_1gpu_contig.json" 2>&1 | grep -v "NIXL INFO"
timeout 120 python3 -m benchmarks.kv_transfer_bench --backends nixl,grpc --recv-device cuda:0 \
    --send-device cuda:0 --tokens 1024,4096 --trials 5 --json "$OUT/kv_1gpu.json" 2>&1 | grep -v "NIXL INFO"
timeout 240 python3 -m benchmarks.goodput --layout pd --kv-transfer-backend nixl $G \
    --json "$OUT/pd1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-pd1 2>&1 | grep -v "NIXL INFO"
timeout 220 python3 -m benchmarks.goodput --layout colocated --replicas 1 $G \
    --json "$OUT/col1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-col1 2>&1
tail -n 30 /tmp/l-pd1/*.log > "$OUT/pd1_logs.txt" 2>/dev/null
