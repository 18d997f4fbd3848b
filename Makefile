# Two entry points: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install serve test proto

install:
	@# CPU machines: take the CPU build of torch that lies on disk before the project,
	@# so pip does not fetch a multi-GB CUDA build. A machine that already has torch>=2.11 keeps it.
	$(PYTHON) -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null \
		|| $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'

serve: install
	tandem serve

test: install
	$(PYTHON) -m pytest -q

proto:
	$(PYTHON) -m proto.gen
