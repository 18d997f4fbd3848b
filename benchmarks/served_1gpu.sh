#!/usr/bin/env bash
# Issue 9 on one H200, in one device call (< 9 minutes): the served benchmark for W1-W4 with
# Llama-3.1-8B shapes (bf16, dummy weights): the in-process engine first, then `tandem serve
# --colocated` and `tandem serve` P+D sharing GPU 0 with nixl KV, all requests at t=0.
# JSON and a markdown section land in OUT (the JSON is rewritten after every row, so a run cut
# by the timeout still leaves the rows it measured; on SIGTERM the report is written too).
#   bash benchmarks/device_wheels.sh      # here, once: carry ".whl" and "build/goodput_whl"
#   OUT=/tmp/out [COMMIT=abc1234] bash benchmarks/served_1gpu.sh
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the device's .git may be stale
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl build/goodput_whl/*.whl \
        2>&1 | grep -v -i "warning" || true
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 -m benchmarks.served_client 10,5 2>&1 | tee "$OUT/client_capacity.txt"
# P+D on one GPU: `tandem serve` starts both workers at once and each sizes its KV cache from
# the memory free at that moment, so both take ~90% of the GPU and one fails; fixed page counts
# (2 MiB a page: 2 x (16 GB weights + 32 GiB KV)) make the start deterministic. Colocated runs
# with the defaults users get.
timeout -k 45 470 python3 -m benchmarks.served --device cuda --layouts colocated,pd \
    --workloads "${WORKLOADS:-W1,W2,W3,W4}" --kv-transfer-backend nixl \
    --pd-serve-args "${PD_ARGS:---num-pages 16384}" --inprocess-timeout 200 --request-timeout 150 \
    --startup-timeout 240 --commit "$COMMIT" --log-dir /tmp/served-logs \
    --json "$OUT/served_1gpu.json" --results-md "$OUT/served_1gpu.md" 2>&1 | grep -v "NIXL INFO"
for f in /tmp/served-logs/serve-*.log /tmp/served-logs/inprocess.log; do
    [ -f "$f" ] && { echo "== $f"; tail -n 40 "$f"; } >> "$OUT/served_logs_tail.txt"
done
true
