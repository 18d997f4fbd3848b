# Sourced by the device scripts (benchmarks/*_1gpu.sh, served_*ab.sh): installs the carried wheels
# (benchmarks/device_wheels.sh builds them; carry ".whl" and "build/goodput_whl") into /tmp/site
# and puts them and this tree on the path. A tree without .whl (a machine that has the
# packages) is left as it is.
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl build/goodput_whl/*.whl \
        2>&1 | grep -v -i "warning" || true
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
