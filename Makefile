# Two entry points for a fresh machine: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgesplit-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt "Cython>=3.0" "numpy>=1.24"
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[edge,cloud,dev,bench]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/edgesplit simulate --config examples/demo.toml --clients 20 --partition dirichlet:0.5

test: setup
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null); } || \
	  echo "note: mosquitto not installed; integration tests will be skipped"
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info runs

bench: setup
	for b in edge_latency transport round_overhead he_aggregation dp_overhead secagg_overhead \
	  split_throughput dp_accuracy; do $(PY) benchmarks/$$b.py || exit 1; done
