# Two entry points: `make serve` and `make test`. Each installs what it needs first (serve: the
# serving dependencies only, about 1.2 GB with the CPU torch; test: the test tools too).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-serve serve test proto etcd

# What serving needs, and no more: no test tools; on a machine without an NVIDIA GPU no CUDA-only
# wheels either (triton and nixl come with the `gpu` extra, taken where nvidia-smi runs).
GPU_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo '[gpu]')

install-serve:
	@# CPU machines: take the CPU build of torch that lies on disk before the project,
	@# so pip does not fetch a multi-GB CUDA build. A machine that already has torch>=2.11 keeps it.
	$(PYTHON) -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null \
		|| $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.$(GPU_EXTRA)'

install: install-serve
	$(PIP) install -q -e '.[test]'

serve: install-serve
	$(PYTHON) -m tandem_cli.main serve $(SERVE_ARGS)

test: install etcd
	$(PYTHON) -m pytest -q

# The membership tests run a real etcd (Debian package etcd-server). Installed here when
# missing and we are root with apt-get (CI); otherwise those tests skip and say why.
etcd:
	@command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server; \
		else \
			echo "warning: no etcd binary and cannot apt-get install etcd-server: membership tests will skip"; \
		fi; }

proto:
	$(PYTHON) -m proto.gen
