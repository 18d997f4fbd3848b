#!/usr/bin/env bash
# benchmarks.mps_graph_probe without MPS and as an MPS client at 40% of the SMs (issue 15).
#   OUT=/tmp/out bash benchmarks/mps_graph_1gpu.sh      # carry ".whl" and "build/goodput_whl"
set -u
OUT=${OUT:?set OUT}
source benchmarks/device_env.sh
timeout 120 python3 -m benchmarks.mps_graph_probe --out "$OUT/plain.json" > "$OUT/plain.txt" 2>&1
grep "^{" "$OUT/plain.txt"
source benchmarks/mps_env.sh
for pct in ${PCTS:-40}; do
    echo "== MPS client at $pct% of the SMs"
    mps_client "$pct" timeout 150 python3 -m benchmarks.mps_graph_probe --out "$OUT/mps$pct.json" 2>&1 | grep -v "^WARNING" | tail -30
done
mps_quit
