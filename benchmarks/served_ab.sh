#!/usr/bin/env bash
# Two trees served side by side in one device call: was a served slowdown the code or the host?
# Runs this tree's colocated + P+D rows, then an older tree's P+D rows (unpacked under OLD, e.g.
# `git archive 85b24ad | tar -x -C build/old85`, carried), then this tree's P+D again, so host
# drift within the call shows as a difference between the two runs of this tree. Also records the
# host's CPU and a fixed pure-Python timing loop (host speed differs between device calls).
# LAYOUTS (default pd) picks the rows compared; this tree's first run adds colocated unless
# LAYOUTS names it. NEW_ARGS: more benchmarks.served flags for this tree's first run (traces).
#   OUT=/tmp/out COMMIT=abc1234 OLD=build/old85 OLD_COMMIT=85b24ad bash benchmarks/served_ab.sh
#   LAYOUTS=colocated WORKLOADS=W3,W2 ... bash benchmarks/served_ab.sh   # a colocated A/B
set -u
OUT=${OUT:?set OUT}
OLD=${OLD:?set OLD (an unpacked older tree)}
COMMIT=${COMMIT:-unknown}
OLD_COMMIT=${OLD_COMMIT:-old}
WL=${WORKLOADS:-W2,W3}
LAYOUTS=${LAYOUTS:-pd}
source benchmarks/device_env.sh
host_speed() {  # ms for a fixed pure-Python loop (median of 5): the host's single-thread speed
    python3 - <<'PY'
import time, statistics
def loop():
    t = time.perf_counter(); d = {}
    for i in range(300000):
        d[i & 1023] = d.get(i & 1023, 0) + i
    return (time.perf_counter() - t) * 1e3
print(f"host_speed_ms {statistics.median(loop() for _ in range(5)):.1f}")
PY
}
{ lscpu | grep -E "Model name|^CPU\(s\)|MHz"; nproc; uptime; } > "$OUT/host.txt"
host_speed >> "$OUT/host.txt"
run() {  # tree tag commit layouts [more flags]
    local tree=$1 tag=$2 commit=$3 layouts=$4 more=${5:-}
    echo "== $tag ($commit) $layouts $WL" | tee -a "$OUT/host.txt"
    ( cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout -k 30 280 python3 -m benchmarks.served --device cuda \
        --no-inprocess --layouts "$layouts" --workloads "$WL" --kv-transfer-backend nixl --warmup 2 \
        --pd-serve-args "--request-trace-file $OUT/${tag}_pd_trace.jsonl" \
        --request-timeout 150 --startup-timeout 240 --commit "$commit" \
        --log-dir "/tmp/served-logs-$tag" --json "$OUT/$tag.json" $more 2>&1 | grep -v "NIXL INFO" | tail -n 30 )
    host_speed >> "$OUT/host.txt"
}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
first=$LAYOUTS
[[ ",$LAYOUTS," == *,colocated,* ]] || first=colocated,$LAYOUTS
run "$PWD" new "$COMMIT" "$first" "${NEW_ARGS:-}"
run "$OLD" old "$OLD_COMMIT" "$LAYOUTS"
run "$PWD" new2 "$COMMIT" "$LAYOUTS"
cat "$OUT/host.txt"
true
