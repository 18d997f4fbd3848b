#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its Python 3.12 has torch, triton, transformers, but an
# older grpcio and no nixl / fastapi / uvicorn / pydantic / httptools / uvloop / xgrammar). Run here, in the repo root; both
# folders are git-ignored. Carry ".whl" (and "build/goodput_whl" for the router) in device
# calls and start each with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl build/goodput_whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p .whl build/goodput_whl /tmp/nixl_whl
python3 -m pip download -q "${PLAT[@]}" -d .whl grpcio==1.85.1 protobuf==7.36.2 nixl==1.5.1
python3 -m pip download -q "${PLAT[@]}" -d build/goodput_whl fastapi==0.165.0 starlette==1.10.0 \
    uvicorn==0.54.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.7.0 \
    typing_inspection==0.4.2 opentelemetry_api==1.45.2 httptools==0.9.0 uvloop==0.23.0 \
    xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
# The served benchmark's client (benchmarks/served_client.py) uses aiohttp, which the GPU image
# already has (with multidict, yarl, frozenlist, aiosignal, propcache, aiohappyeyeballs, attrs).
# nixl-cu13 is 59 MB; its expert-parallel torch extensions (nixl_ep, one per torch 2.12-2.14,
# unused here) are dropped so that everything fits the 64 MiB a call may carry.
python3 -m pip download -q "${PLAT[@]}" -d /tmp/nixl_whl nixl-cu13==1.5.1
python3 - <<'PY'
import glob, zipfile
src = glob.glob("/tmp/nixl_whl/nixl_cu13-*.whl")[0]
drop = lambda n: n.startswith("nixl_ep_cu13/") and "torch21" in n
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(".whl/" + src.rsplit("/", 1)[1], "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if drop(info.filename):
            continue
        data = zi.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not drop(l.decode()))
        zo.writestr(info, data)
PY
du -sh .whl build/goodput_whl
