#!/usr/bin/env bash
# Issue 5 on two GPUs of one host (device kind nvidia-h200-x2), in one device call: KV
# transfer bandwidth GPU 0 -> GPU 1 (nixl, pages scattered and consecutive; grpc), then the
# goodput of 1P+1D (prefill on GPU 0, decode on GPU 1, nixl KV) and of colocated x2, same flags.
#   OUT=/tmp/out [COMMIT=abc1234] bash benchmarks/goodput_2gpu.sh
set -u
OUT=${OUT:?set OUT}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # NVLink multicast off
COMMIT=${COMMIT:-$(git rev-parse --short HEAD)}
G="--device cuda --gpus 0,1 --duration 10 --start-rate 4 --max-rate 128 --min-rate 0.5 --search-steps 2 --commit $COMMIT"
for order in contiguous random; do
  timeout 150 python3 -m benchmarks.kv_transfer_bench --backends nixl --pages $order --send-device cuda:0 \
      --recv-device cuda:1 --tokens 1024,4096 --trials 5 --json "$OUT/kv_2gpu_$order.json" 2>&1 | grep -v "NIXL INFO"
done
timeout 100 python3 -m benchmarks.kv_transfer_bench --backends grpc --send-device cuda:0 --recv-device cuda:1 \
    --tokens 1024 --trials 3 --json "$OUT/kv_2gpu_grpc.json"
timeout 240 python3 -m benchmarks.goodput --layout pd --num-prefill 1 --num-decode 1 --kv-transfer-backend nixl $G \
    --json "$OUT/pd2.json" --results-md "$OUT/goodput2.md" --log-dir /tmp/l-pd2 2>&1 | grep -v "NIXL INFO"
timeout 240 python3 -m benchmarks.goodput --layout colocated --replicas 2 $G \
    --json "$OUT/col2.json" --results-md "$OUT/goodput2.md" --log-dir /tmp/l-col2
