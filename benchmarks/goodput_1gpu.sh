#!/usr/bin/env bash
# Issue 15 on one GPU, in one device call: the same goodput search (same SLOs, mix W1+W3,
# flags) for three layouts of GPU 0: P+D time-sliced (two processes, the driver's slices),
# P+D partitioned (side by side under CUDA MPS, prefill PREFILL_SM % of the SMs, decode the
# rest; benchmarks/layouts.py starts and quits the MPS daemon and fails if MPS is not
# available), and colocated x1. First the KV handover bandwidth on one GPU (nixl, 1k and 4k
# tokens, consecutive pages); last, partitioned P+D at colocated x1's goodput rate (its TPOT
# p99 against colocated's) when the call has time left. Writes JSON and a markdown section per run under OUT.
#   OUT=/tmp/out [COMMIT=abc1234] [PREFILL_SM=0.6] [TURNS=1] [KV_SCATTERED=1] bash benchmarks/goodput_1gpu.sh
# TURNS=1 adds P+D with GPU turns (serve's fallback when MPS is missing); KV_SCATTERED=1 the
# scattered-page kv bench of issue 5. Both make the call longer than the 600 s a device call gets.
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD)}   # the device's checkout may carry a stale .git
PREFILL_SM=${PREFILL_SM:-0.6}
source benchmarks/device_env.sh
G="--device cuda --gpus 0 --duration 8 --start-rate 4 --max-rate 64 --min-rate 0.5 --search-steps 1 --commit $COMMIT"
timeout 45 python3 -m benchmarks.kv_transfer_bench --backends nixl --pages contiguous --recv-device cuda:0 \
    --send-device cuda:0 --tokens 1024,4096 --trials 5 --json "$OUT/kv_1gpu_contig.json" 2>&1 | grep -v "NIXL INFO"
if [ "${KV_SCATTERED:-0}" = 1 ]; then
  timeout 120 python3 -m benchmarks.kv_transfer_bench --backends nixl,grpc --recv-device cuda:0 \
      --send-device cuda:0 --tokens 1024,4096 --trials 5 --json "$OUT/kv_1gpu.json" 2>&1 | grep -v "NIXL INFO"
fi
timeout 170 python3 -m benchmarks.goodput --layout colocated --replicas 1 $G \
    --json "$OUT/col1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-col1 2>&1
timeout 170 python3 -m benchmarks.goodput --layout pd --kv-transfer-backend nixl --gpu-sharing none $G \
    --json "$OUT/pd1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-pd1 2>&1 | grep -v "NIXL INFO"
timeout 200 python3 -m benchmarks.goodput --layout pd --kv-transfer-backend nixl --gpu-sharing mps \
    --prefill-sm-fraction "$PREFILL_SM" $G \
    --json "$OUT/pd1_mps.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-pd1-mps 2>&1 | grep -v "NIXL INFO"
if [ "${TURNS:-0}" = 1 ]; then
  timeout 170 python3 -m benchmarks.goodput --layout pd --kv-transfer-backend nixl --gpu-sharing turns $G \
      --json "$OUT/pd1_turns.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-pd1-turns 2>&1 | grep -v "NIXL INFO"
fi
# partitioned P+D at colocated x1's goodput rate (the TPOT p99 comparison), if the call has time
R=$(python3 -c "import json; print(json.load(open('$OUT/col1.json'))['goodput'] or '')" 2>/dev/null)
if [ -n "$R" ] && [ "$SECONDS" -lt 480 ]; then
  timeout $((590 - SECONDS)) python3 -m benchmarks.goodput --layout pd --kv-transfer-backend nixl --gpu-sharing mps \
      --prefill-sm-fraction "$PREFILL_SM" ${G/--start-rate 4/--rates $R} \
      --json "$OUT/pd1_mps_at_col1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-pd1-mps-r 2>&1 | grep -v "NIXL INFO"
fi
tail -n 30 /tmp/l-pd1/*.log > "$OUT/pd1_logs.txt" 2>/dev/null
tail -n 30 /tmp/l-pd1-mps/*.log > "$OUT/pd1_mps_logs.txt" 2>/dev/null
# the goodput ratios the issue asks for (partitioned vs colocated x1 and vs time-sliced), and
# TPOT p99 of each layout at colocated x1's goodput rate
python3 - "$OUT" <<'EOF' | tee "$OUT/compare.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {n: json.loads((out / f"{n}.json").read_text()) for n in ("pd1", "pd1_mps", "col1", "pd1_mps_at_col1")
        if (out / f"{n}.json").exists()}
for n, r in runs.items():
    print(f"{n}: {r['layout']}: goodput {r['goodput']:g} req/s")
if {"pd1", "pd1_mps", "col1"} <= set(runs):
    g = {n: r["goodput"] for n, r in runs.items()}
    ratio = lambda a, b: f"{g[a] / g[b]:.2f}x" if g[b] else "inf"
    print(f"partitioned / colocated x1: {ratio('pd1_mps', 'col1')} (target >= 1.2x); "
          f"partitioned / time-sliced: {ratio('pd1_mps', 'pd1')} (target >= 1.5x)")
    rate = g["col1"]
    tp = {}
    for n, r in runs.items():
        rows = [row for row in r["rows"] if row["rate"] == rate]
        tp[n] = rows[0].get("tpot_p99_ms") if rows else None
        print(f"TPOT p99 at {rate:g} req/s, {n}: {tp[n] if tp[n] is not None else 'not measured at that rate'}")
    mps = tp.get("pd1_mps_at_col1") or tp.get("pd1_mps")
    if mps and tp.get("col1"):
        print(f"partitioned TPOT p99 / colocated x1's at {rate:g} req/s: {mps / tp['col1']:.2f} (target <= 0.7)")
EOF
