#!/usr/bin/env bash
# `make serve` on a fresh machine (issue 12): a new virtual environment, `make serve` into it,
# then the seconds until the demo answers a completion and the environment's size.
#   bash benchmarks/make_serve_fresh.sh            # prints one JSON line
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
python3 -m venv "$work/venv"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
t0=$(date +%s.%N)
make serve PYTHON="$work/venv/bin/python" SERVE_ARGS="--port $port" > "$work/serve.log" 2>&1 &
make_pid=$!
trap 'pkill -TERM -P $make_pid 2>/dev/null || true; kill $make_pid 2>/dev/null || true; sleep 2' EXIT
until grep -q "Tandem is serving" "$work/serve.log"; do
    if ! kill -0 $make_pid 2>/dev/null; then tail -20 "$work/serve.log"; exit 1; fi
    sleep 0.5
done
t_serving=$(date +%s.%N)
curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "Once upon", "max_tokens": 8}' > "$work/answer.json"
t_answer=$(date +%s.%N)
size_mb=$(du -sm "$work/venv" | cut -f1)
python3 - "$t0" "$t_serving" "$t_answer" "$size_mb" "$work/answer.json" <<'PY'
import json, sys
t0, ts, ta, mb, ans = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
out = json.load(open(ans))
print(json.dumps({"venv_mb": mb, "install_and_serving_s": round(ts - t0, 1), "answered_s_after_serving": round(ta - ts, 2),
                  "completion_tokens": out["usage"]["completion_tokens"]}))
PY
