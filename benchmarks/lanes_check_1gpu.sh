#!/usr/bin/env bash
# Issue 15, partitioned lanes on the H200 in one device call: are `--sm-partition` tokens the
# one-stream tokens? float32 (small rounding), all requests at once, no mixed batches in the
# one-stream run (so both runs prefill the same batches): whole outputs and first tokens
# compared. Then bf16 staggered arrivals (the speed comparison of benchmarks/RESULTS.md), and
# the KV handover share of TTFT for 4k-token prompts.
#   OUT=/tmp/out bash benchmarks/lanes_check_1gpu.sh      # carry ".whl" and "build/goodput_whl"
set -u
OUT=${OUT:?set OUT}
source benchmarks/device_env.sh
S="python3 -m benchmarks.lanes_smoke --requests 64 --output 64"
timeout 120 $S --dtype float32 --every 0 --no-mixed-batches --out "$OUT/f32_one.json" 2>&1 | tail -1
timeout 120 $S --dtype float32 --every 0 --sm-partition 0.5 --compare "$OUT/f32_one.json" --out "$OUT/f32_lanes.json" 2>&1 | tail -1
timeout 100 python3 -m benchmarks.lanes_smoke --out "$OUT/bf16_one.json" 2>&1 | tail -1
timeout 100 python3 -m benchmarks.lanes_smoke --sm-partition 0.5 --compare "$OUT/bf16_one.json" \
    --out "$OUT/bf16_lanes.json" 2>&1 | tail -1
# issue 15's handover bar: 4k-token prompts, lanes; handover (a lane pass's end on the device ->
# its requests admitted to decode) as a share of mean TTFT (bar <= 0.10)
timeout 100 python3 -m benchmarks.lanes_smoke --sm-partition 0.5 --prompt 4096 --output 32 --requests 32 \
    --every 2 --out "$OUT/handover_4k.json" 2>&1 | tail -1
