# Two entry points: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install serve test proto etcd

install:
	@# CPU machines: take the CPU build of torch that lies on disk before the project,
	@# so pip does not fetch a multi-GB CUDA build. A machine that already has torch>=2.11 keeps it.
	$(PYTHON) -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null \
		|| $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

serve: install
	tandem serve

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
