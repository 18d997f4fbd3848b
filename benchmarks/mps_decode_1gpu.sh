#!/usr/bin/env bash
# Issue 15: what an MPS active-thread limit does to one decode step when that process is alone
# on the GPU (no prefill beside it): benchmarks.decode_profile (graph replay, whole step, the
# copy ceiling measured under the same limit, top eager kernels) without MPS, then as an MPS
# client at 40% and at 100% of the SMs.
#   OUT=/tmp/out bash benchmarks/mps_decode_1gpu.sh      # carry ".whl" and "build/goodput_whl"
set -u
OUT=${OUT:?set OUT}
source benchmarks/device_env.sh
run() {  # tag, batch, [mps_client PCT]
    local tag=$1 b=$2; shift 2
    "$@" timeout 150 python3 -m benchmarks.decode_profile --batch "$b" --top 10 --out "$OUT/${tag}_b$b.json" \
        > "$OUT/${tag}_b$b.txt" 2>&1 || echo "$tag b$b failed: $(tail -3 "$OUT/${tag}_b$b.txt")"
}
run plain 16
source benchmarks/mps_env.sh
for pct in 40 100; do
    for b in 16 256; do
        [ "$pct" = 100 ] && [ "$b" = 256 ] && continue
        run "mps$pct" "$b" mps_client "$pct"
    done
done
mps_quit
python3 - "$OUT" <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob(f"{sys.argv[1]}/*_b*.json")):
    r = json.load(open(f))
    print(f"{os.path.basename(f)[:-5]:12s} copy {r['copy_bw'] / 1e9:7.0f} GB/s  replay {1e3 * r.get('replay_s', 0):6.2f} ms  "
          f"step {1e3 * r['step_s']:6.2f} ms  host meta {1e3 * r['host_meta_s']:5.2f} ms  eager kernels "
          f"{r['eager_kernel_ms_total']:6.2f} ms  top: " + "; ".join(f"{k['ms_per_step']:.2f} {k['name'][:40]}" for k in r["kernels"][:4]))
PY
