#!/usr/bin/env bash
# Issue 9 on one H200, in one device call (< 9 minutes): the served benchmark with Llama-3.1-8B
# shapes (bf16, dummy weights): the in-process engine first, then `tandem serve --colocated` and
# `tandem serve` P+D sharing GPU 0 with nixl KV, both at the defaults users get (no memory or
# backend flags), all requests at t=0. W2 runs first, then W3, then W1: the workloads draw their
# prompts from one seed, so a later workload can hit an earlier one's prefixes in a served run
# (the in-process run empties its cache between workloads); this order keeps that to 6 W3 and
# 33 W1 prompts. Also: request timelines and engine step traces (JSON lines; in-process steps too)
# and py-spy (GIL holder) summaries of every served process during W3. Everything lands in OUT (the JSON is rewritten after every row).
#   bash benchmarks/device_wheels.sh      # here, once: carry ".whl" and "build/goodput_whl"
#   OUT=/tmp/out COMMIT=abc1234 bash benchmarks/served_1gpu.sh
#   LAYOUTS=colocated ... bash benchmarks/served_1gpu.sh    # issue 14's served ratio only (~4 minutes)
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the device's .git may be stale
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout -k 45 500 python3 -m benchmarks.served --device cuda --layouts "${LAYOUTS:-colocated,pd}" \
    --workloads "${WORKLOADS:-W2,W3,W1}" --kv-transfer-backend nixl \
    --pd-serve-args "--request-trace-file $OUT/pd_trace.jsonl --step-trace-file $OUT/pd_steps.jsonl ${PD_ARGS:-}" \
    --colocated-serve-args "--request-trace-file $OUT/colo_trace.jsonl --step-trace-file $OUT/colo_steps.jsonl" \
    --bench-args "--step-trace-file $OUT/inproc_steps.jsonl" \
    --py-spy "$OUT" --py-spy-workloads W3 --warmup 2 \
    --inprocess-timeout 200 --request-timeout 150 --startup-timeout 240 --commit "$COMMIT" \
    --log-dir /tmp/served-logs --json "$OUT/served_1gpu.json" --results-md "$OUT/served_1gpu.md" 2>&1 \
    | grep -v "NIXL INFO"
for f in /tmp/served-logs/serve-*.log /tmp/served-logs/inprocess.log; do
    [ -f "$f" ] && { echo "== $f"; grep -v "POST /v1" "$f" | tail -n 40; } >> "$OUT/served_logs_tail.txt"
done
true
