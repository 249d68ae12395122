# Two commands for users and CI: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lndgst-installed
TORCH := torch==2.14.1 torchvision==0.29.1
# Fit nnU-Net's worker processes to small machines (overridable from the environment).
export nnUNet_n_proc_DA ?= 0
export nnUNet_def_n_proc ?= 2
# pytest-xdist workers for `make test` (each gets cores/workers torch threads, see Testing/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lndgst demo

test: setup
	$(PY) -m pytest Testing -q -p no:cacheprovider --durations=15 -n $(TEST_WORKERS) --dist loadgroup

bench: setup
	$(PY) Testing/benchmarks/bench_segment.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
