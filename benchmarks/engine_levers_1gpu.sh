#!/usr/bin/env bash
# Issue 14 on the H200 in one device call: the engine's kernel and greedy tests, then the
# kernels (shared-prefix decode, prompts by cuDNN attention vs the paged extend kernel), then
# W1-W4 in process with each opt-in or default lever on and off, back to back:
#   - shared-prefix decode attention (default on; --disable-cascade-attn off): W2 is the one
#     workload it changes;
#   - cuDNN attention for prompts without a cached prefix ($TANDEM_DENSE_PREFILL=1, opt-in):
#     W1 and W4 (each pass's prompts are of one length there).
#   OUT=/tmp/out COMMIT=abc1234 bash benchmarks/engine_levers_1gpu.sh   # carry ".whl", "build/goodput_whl"
# PAGES=1 adds decode_profile with three page layouts (~2 min). ~7 minutes on a warm machine (OMP_NUM_THREADS=2: 8 test workers with 16 torch threads each crawl). GREEDY=0 skips tests/test_triton_greedy_gpu.py (the slow one).
set -u
OUT=${OUT:?set OUT}
COMMIT=${COMMIT:-unknown}
source benchmarks/device_env.sh
T=(tests/test_triton_kernels.py tests/test_shared_prefix_attention.py)
[ "${GREEDY:-1}" = 1 ] && T+=(tests/test_triton_greedy_gpu.py)
OMP_NUM_THREADS=2 timeout -k 10 300 python3 -m pytest -q -n 8 -p no:cacheprovider "${T[@]}" 2>&1 | tail -3
timeout -k 10 150 python3 benchmarks/kernel_bench.py --only shared,extend --no-sweep --profile \
    --out "$OUT/kernels.json" 2>&1 | grep -E "^(decode|extend)" | grep -v ": _"
B=(python3 -m benchmarks.bench --device cuda --modes colocated --commit "$COMMIT" --date "$(date -u +%F)")
run() {   # tag, env, args...
    local tag=$1 env=$2
    shift 2
    env $env timeout -k 10 200 "${B[@]}" "$@" --json "$OUT/$tag.json" --log-dir "/tmp/levers-$tag" 2>&1 \
        | grep -E "^\| colo|rror:|prefill attention of prompts" | sed "s/^/$tag /"
}
run base "TANDEM_DENSE_PREFILL=" --workloads W1,W2,W3,W4
run dense "TANDEM_DENSE_PREFILL=1" --workloads W1,W4
run nocascade "TANDEM_DENSE_PREFILL=" --workloads W2 --disable-cascade-attn
if [ "${PAGES:-0}" = 1 ]; then   # the decode step by page layout (W3's device time vs the contiguous replay)
    for order in contiguous interleaved shuffled; do
        timeout -k 10 150 python3 -m benchmarks.decode_profile --batch 256 --context 640 --page-order $order \
            --out "$OUT/decode_$order.json" 2>&1 | grep -E '"(page_order|replay_s|replay_mbu|step_mbu)"'
    done
fi
