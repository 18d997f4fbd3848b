#!/usr/bin/env bash
# The decode worker's GIL switch interval, A/B in one device call: served colocated W2 and W3,
# four runs alternating $TANDEM_GIL_SWITCH_MS unset/5 ms and 0.5 ms (benchmarks/RESULTS.md).
# Since a4d3a4b the workers default to 0.5 ms, so "d5" runs set 5 explicitly.
#   OUT=/tmp/out COMMIT=abc1234 bash benchmarks/served_gil_ab.sh   # carry .whl, build/goodput_whl
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-unknown}
source benchmarks/device_env.sh
for tag in d5 s05 d5b s05b; do
    case $tag in s05*) export TANDEM_GIL_SWITCH_MS=0.5 ;; *) export TANDEM_GIL_SWITCH_MS=5 ;; esac
    timeout -k 20 170 python3 -m benchmarks.served --device cuda --no-inprocess --layouts colocated \
        --workloads W2,W3 --warmup 2 --colocated-serve-args "--step-trace-file $OUT/${tag}_steps.jsonl" \
        --request-timeout 120 --startup-timeout 120 --commit "$COMMIT" --log-dir "/tmp/sl-$tag" \
        --json "$OUT/$tag.json" 2>&1 | grep -E "^\[colocated\] W" | sed "s/^/$tag /"
done
true
