#!/usr/bin/env bash
# Issue 15: do SM partitions compute right? `python -m engine.gemm_check` (the check workers
# and tandem serve run) as an MPS client at 40% and 100% of the SMs, then
# benchmarks.green_ctx_probe (green contexts of >= 64 SMs and the rest, inside one process).
#   OUT=/tmp/out bash benchmarks/partition_check_1gpu.sh      # carry ".whl" and "build/goodput_whl"
set -u
OUT=${OUT:?set OUT}
source benchmarks/device_env.sh
ENVS=$(python3 -c "
import json; from tandem_cli.mps import start_mps
d = start_mps(); print('ENV', json.dumps(d.env()))" | sed -n 's/^ENV //p')
PIPE=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['CUDA_MPS_PIPE_DIRECTORY'])" "$ENVS")
LOGD=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['CUDA_MPS_LOG_DIRECTORY'])" "$ENVS")
for pct in 40 100; do
    CUDA_MPS_PIPE_DIRECTORY="$PIPE" CUDA_MPS_LOG_DIRECTORY="$LOGD" CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct \
        timeout 90 python3 -m engine.gemm_check; echo "gemm_check as an MPS client at $pct%: exit $?"
done
echo quit | CUDA_MPS_PIPE_DIRECTORY="$PIPE" CUDA_MPS_LOG_DIRECTORY="$LOGD" nvidia-cuda-mps-control
timeout 90 python3 -m engine.gemm_check; echo "gemm_check without MPS: exit $?"
timeout 120 python3 -m benchmarks.green_ctx_probe --out "$OUT/green.json" 2>&1 | tail -20
