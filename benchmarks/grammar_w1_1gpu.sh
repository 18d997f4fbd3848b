#!/usr/bin/env bash
# Issue 13's H200 bar in one device call: served colocated W1 without and with a json_schema on
# every request (response_format on /v1/completions), same flags, same tokenizer: a byte-level
# BPE of 128k tokens (benchmarks.grammar_mask's, trained on JSON-like text; the default
# word-level "<tN>" vocabulary cannot spell "{", so a grammar could never start). Step traces
# carry each step's grammar mask time (grammar_rows, grammar_ms); the decode worker logs a
# refused or empty mask once, and this script fails the run if it did.
#   bash benchmarks/device_wheels.sh   # here, once: carry ".whl", "build/goodput_whl" and
#   PYTHONPATH=. python3 -m benchmarks.grammar_mask --vocab 128000 --cache-dir build/bpe   # "build/bpe" (else trained there: slow)
#   OUT=/tmp/out COMMIT=abc1234 bash benchmarks/grammar_w1_1gpu.sh
# DEVICE=cpu TINY=1 tries the same on the CPU with the tiny model.
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-unknown}
DEVICE=${DEVICE:-cuda}
TINY_FLAG=(); [ "${TINY:-0}" = 1 ] && TINY_FLAG=(--tiny --num-requests 8 --client-procs 1)
source benchmarks/device_env.sh
# the tokenizer (trained once into build/bpe) and the host's fill time for a 256-row step outside the server
python3 -m benchmarks.grammar_mask --vocab 128000 --cache-dir build/bpe --batch 256 --steps 200 \
    --json "$OUT/fill_256.json" || exit 1
TOK=build/bpe/bpe-128000
SCHEMA='{"response_format": {"type": "json_schema", "json_schema": {"name": "notes", "strict": true, "schema":
 {"type": "object", "properties": {"title": {"type": "string"}, "notes": {"type": "array", "items":
 {"type": "object", "properties": {"n": {"type": "integer"}, "text": {"type": "string"}},
  "required": ["n", "text"]}}}, "required": ["title", "notes"]}}}}'
for tag in plain schema; do
    extra=(); [ "$tag" = schema ] && extra=(--extra-body "$(echo "$SCHEMA" | tr -d '\n')")
    timeout -k 20 280 python3 -m benchmarks.served --device "$DEVICE" "${TINY_FLAG[@]}" --no-inprocess \
        --layouts colocated --workloads W1 --warmup 2 --tokenizer "$TOK" "${extra[@]}" \
        --colocated-serve-args "--step-trace-file $OUT/${tag}_steps.jsonl" --request-timeout 200 \
        --startup-timeout 200 --commit "$COMMIT" --log-dir "/tmp/gw-$tag" --json "$OUT/$tag.json" 2>&1 \
        | grep -E "^\[colocated\] W|Error" | sed "s/^/$tag /"
done
bad=$(grep -h "refused replayed token\|no token of this vocabulary" /tmp/gw-schema/*.log | head -3)
python3 - "$OUT" "$bad" <<'PY'
import json, sys, statistics
out, bad = sys.argv[1], sys.argv[2]
rows = {t: json.load(open(f"{out}/{t}.json"))["rows"][0] for t in ("plain", "schema")}
steps = [json.loads(l) for l in open(f"{out}/schema_steps.jsonl")]
g = [s for s in steps if s.get("grammar_rows")]
print(f"W1 out tok/s plain {rows['plain']['output_tok_s']:,.0f}, json_schema {rows['schema']['output_tok_s']:,.0f}: "
      f"{rows['schema']['output_tok_s'] / rows['plain']['output_tok_s']:.3f}x (bar >= 0.9)")
if g:
    ms = [s["grammar_ms"] for s in g]
    full = [s["grammar_ms"] for s in g if s["grammar_rows"] >= 200]
    print(f"grammar mask host time per step: median {statistics.median(ms):.2f} ms, max {max(ms):.2f} ms over "
          f"{len(g)} steps; steps of >= 200 rows: median {statistics.median(full) if full else 0:.2f} ms; "
          f"step time median {statistics.median(s['step_ms'] for s in g):.2f} ms")
print("grammar failures in the decode log:", bad or "none")
sys.exit(1 if bad else 0)
PY
