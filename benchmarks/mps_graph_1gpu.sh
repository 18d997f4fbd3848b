#!/usr/bin/env bash
# benchmarks.mps_graph_probe without MPS and as an MPS client at 40% of the SMs (issue 15).
#   OUT=/tmp/out bash benchmarks/mps_graph_1gpu.sh      # carry ".whl" and "build/goodput_whl"
set -u
OUT=${OUT:?set OUT}
source benchmarks/device_env.sh
timeout 120 python3 -m benchmarks.mps_graph_probe --out "$OUT/plain.json" > "$OUT/plain.txt" 2>&1
grep "^{" "$OUT/plain.txt"
ENVS=$(python3 -c "
import json; from tandem_cli.mps import start_mps
d = start_mps(); print('ENV', json.dumps(d.env()))" | sed -n 's/^ENV //p')
[ -z "$ENVS" ] && { echo "MPS did not start"; exit 1; }
PIPE=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['CUDA_MPS_PIPE_DIRECTORY'])" "$ENVS")
LOGD=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['CUDA_MPS_LOG_DIRECTORY'])" "$ENVS")
for pct in ${PCTS:-40}; do
    echo "== MPS client at $pct% of the SMs"
    CUDA_MPS_PIPE_DIRECTORY="$PIPE" CUDA_MPS_LOG_DIRECTORY="$LOGD" CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct \
        timeout 150 python3 -m benchmarks.mps_graph_probe --out "$OUT/mps$pct.json" 2>&1 | grep -v "^WARNING" | tail -30
done
echo quit | CUDA_MPS_PIPE_DIRECTORY="$PIPE" CUDA_MPS_LOG_DIRECTORY="$LOGD" nvidia-cuda-mps-control
