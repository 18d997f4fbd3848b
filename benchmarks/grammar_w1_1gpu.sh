#!/usr/bin/env bash
# Issue 13's H200 bar in one device call: served colocated W1 without and with a json_schema on
# every request (response_format on /v1/completions), same flags; step traces carry each step's
# grammar mask time (grammar_rows, grammar_ms) and the decode worker's /metrics its totals.
#   bash benchmarks/device_wheels.sh   # here, once: carry ".whl" and "build/goodput_whl"
#   OUT=/tmp/out COMMIT=abc1234 bash benchmarks/grammar_w1_1gpu.sh
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-unknown}
source benchmarks/device_env.sh
SCHEMA='{"response_format": {"type": "json_schema", "json_schema": {"name": "notes", "strict": true, "schema":
 {"type": "object", "properties": {"title": {"type": "string"}, "notes": {"type": "array", "items":
 {"type": "object", "properties": {"n": {"type": "integer"}, "text": {"type": "string"}},
  "required": ["n", "text"]}}}, "required": ["title", "notes"]}}}}'
for tag in plain schema; do
    extra=(); [ "$tag" = schema ] && extra=(--extra-body "$(echo "$SCHEMA" | tr -d '\n')")
    timeout -k 20 280 python3 -m benchmarks.served --device cuda --no-inprocess --layouts colocated \
        --workloads W1 --warmup 2 "${extra[@]}" \
        --colocated-serve-args "--step-trace-file $OUT/${tag}_steps.jsonl" --request-timeout 200 \
        --startup-timeout 200 --commit "$COMMIT" --log-dir "/tmp/gw-$tag" --json "$OUT/$tag.json" 2>&1 \
        | grep -E "^\[colocated\] W|Error" | sed "s/^/$tag /"
done
python3 - "$OUT" <<'PY'
import json, sys, statistics
out = sys.argv[1]
rows = {t: json.load(open(f"{out}/{t}.json"))["rows"][0] for t in ("plain", "schema")}
steps = [json.loads(l) for l in open(f"{out}/schema_steps.jsonl")]
g = [s["grammar_ms"] for s in steps if s.get("grammar_rows")]
print(f"W1 out tok/s plain {rows['plain']['output_tok_s']:,.0f}, json_schema {rows['schema']['output_tok_s']:,.0f}: "
      f"{rows['schema']['output_tok_s'] / rows['plain']['output_tok_s']:.3f}x (bar >= 0.9)")
if g:
    print(f"grammar mask host time per step: median {statistics.median(g):.2f} ms, max {max(g):.2f} ms over {len(g)} steps")
PY
true
