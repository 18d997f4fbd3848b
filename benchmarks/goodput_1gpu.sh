#!/usr/bin/env bash
# Issue 15 on one GPU, in one device call: the same goodput search (same SLOs, mix W1+W3,
# flags) for three layouts of GPU 0: colocated x1 (one stream), P+D time-sliced (two
# processes, the driver's slices), and partitioned: one colocated worker whose prefill and
# decode passes run side by side on green-context SM partitions (`--sm-partition`,
# decode_worker/lanes.py; MPS with an SM limit computed wrong products on the H200, see
# benchmarks/RESULTS.md, and workers now refuse to start that way). First the KV handover
# bandwidth on one GPU (nixl, 1k and 4k tokens, consecutive pages); last, partitioned at
# colocated x1's goodput rate (its TPOT p99 against colocated's) when the call has time left.
#   OUT=/tmp/out [COMMIT=abc1234] [SM_PARTITION=0.5] [ADAPTIVE=1] [TURNS=1] bash benchmarks/goodput_1gpu.sh
# ADAPTIVE=1: the partitioned worker moves its share live (--sm-partition-adaptive, same SLOs).
# TURNS=1 adds P+D with GPU turns; it makes the call longer than the 600 s a device call gets.
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD)}   # the device's checkout may carry a stale .git
SM_PARTITION=${SM_PARTITION:-0.5}
LANES="--sm-partition $SM_PARTITION"; [ "${ADAPTIVE:-0}" = 1 ] && LANES="$LANES --sm-partition-adaptive"
source benchmarks/device_env.sh
G="--device cuda --gpus 0 --duration 8 --start-rate 4 --max-rate 64 --min-rate 0.5 --search-steps 2 --commit $COMMIT"
timeout 45 python3 -m benchmarks.kv_transfer_bench --backends nixl --pages contiguous --recv-device cuda:0 \
    --send-device cuda:0 --tokens 1024,4096 --trials 5 --json "$OUT/kv_1gpu_contig.json" 2>&1 | grep -v "NIXL INFO"
timeout 170 python3 -m benchmarks.goodput --layout colocated --replicas 1 $G \
    --json "$OUT/col1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-col1 2>&1
timeout 170 python3 -m benchmarks.goodput --layout pd --kv-transfer-backend nixl --gpu-sharing none $G \
    --json "$OUT/pd1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-pd1 2>&1 | grep -v "NIXL INFO"
timeout 170 python3 -m benchmarks.goodput --layout colocated --replicas 1 $LANES $G \
    --json "$OUT/lanes1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-lanes1 2>&1
if [ "${TURNS:-0}" = 1 ]; then
  timeout 170 python3 -m benchmarks.goodput --layout pd --kv-transfer-backend nixl --gpu-sharing turns $G \
      --json "$OUT/pd1_turns.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-pd1-turns 2>&1 | grep -v "NIXL INFO"
fi
# partitioned at colocated x1's goodput rate (the TPOT p99 comparison), if the call has time
R=$(python3 -c "import json; print(json.load(open('$OUT/col1.json'))['goodput'] or '')" 2>/dev/null)
if [ -n "$R" ] && [ "$SECONDS" -lt 480 ]; then
  timeout $((590 - SECONDS)) python3 -m benchmarks.goodput --layout colocated --replicas 1 \
      $LANES ${G/--start-rate 4/--rates $R} \
      --json "$OUT/lanes1_at_col1.json" --results-md "$OUT/goodput.md" --log-dir /tmp/l-lanes1-r 2>&1
fi
tail -n 30 /tmp/l-lanes1/*.log > "$OUT/lanes1_logs.txt" 2>/dev/null
# the goodput ratios the issue asks for (partitioned vs colocated x1 and vs time-sliced), and
# TPOT p99 of each layout at colocated x1's goodput rate
python3 - "$OUT" <<'PY' | tee "$OUT/compare.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {n: json.loads((out / f"{n}.json").read_text()) for n in ("col1", "pd1", "lanes1", "lanes1_at_col1")
        if (out / f"{n}.json").exists()}
for n, r in runs.items():
    print(f"{n}: {r['layout']}: goodput {r['goodput']:g} req/s")
if {"pd1", "lanes1", "col1"} <= set(runs):
    g = {n: r["goodput"] for n, r in runs.items()}
    ratio = lambda a, b: f"{g[a] / g[b]:.2f}x" if g[b] else "inf"
    print(f"partitioned / colocated x1: {ratio('lanes1', 'col1')} (target >= 1.2x); "
          f"partitioned / time-sliced: {ratio('lanes1', 'pd1')} (target >= 1.5x)")
    rate, tp = g["col1"], {}
    for n, r in runs.items():
        rows = [row for row in r["rows"] if row["rate"] == rate]
        tp[n] = rows[0].get("tpot_p99_ms") if rows else None
        print(f"TPOT p99 at {rate:g} req/s, {n}: {tp[n] if tp[n] is not None else 'not measured at that rate'}")
    part = tp.get("lanes1_at_col1") or tp.get("lanes1")
    if part and tp.get("col1"):
        print(f"partitioned TPOT p99 / colocated x1's at {rate:g} req/s: {part / tp['col1']:.2f} (target <= 0.7)")
PY
