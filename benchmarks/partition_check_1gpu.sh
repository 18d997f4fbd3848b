#!/usr/bin/env bash
# Issue 15: do SM partitions compute right? `python -m engine.gemm_check` (the check workers
# and tandem serve run) as an MPS client at 40% and 100% of the SMs, then
# benchmarks.green_ctx_probe (green contexts of >= 64 SMs and the rest, inside one process).
#   OUT=/tmp/out bash benchmarks/partition_check_1gpu.sh      # carry ".whl" and "build/goodput_whl"
set -u
OUT=${OUT:?set OUT}
source benchmarks/device_env.sh
source benchmarks/mps_env.sh
for pct in 40 100; do
    mps_client "$pct" timeout 90 python3 -m engine.gemm_check; echo "gemm_check as an MPS client at $pct%: exit $?"
done
mps_quit
timeout 90 python3 -m engine.gemm_check; echo "gemm_check without MPS: exit $?"
timeout 120 python3 -m benchmarks.green_ctx_probe --out "$OUT/green.json" 2>&1 | tail -20
