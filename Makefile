# Entry points (see README): `make demo`, `make test` and `make benchmarks`. Each creates .venv with a
# Python >= 3.12 (scripts/find_python.sh) and installs the package from pyproject.toml first.
# `make benchmarks` reruns every benchmark with the settings of its section (hours on 2 CPU cores) and
# rebuilds docs/results.md; `make benchmarks BENCH_ARGS=--dry-run` lists the commands,
# `BENCH_ARGS="--only pdae-sim"` runs one; `make results` only rebuilds docs/results.md from the pages.
# `make notebooks` runs the five notebooks with their default parameters (under 3 minutes each on 2 CPU
# cores), prints their summaries and checks the statements their introductions make.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install benchmarks results notebooks

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(PY) ]; then PYBIN=$$(scripts/find_python.sh) || exit 1; $$PYBIN -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/perturbax demo

test: $(VENV)/.installed
	$(PY) -m pytest

benchmarks: $(VENV)/.installed
	$(PY) benchmarks/regenerate.py $(BENCH_ARGS)

results: $(VENV)/.installed
	$(PY) benchmarks/results.py

notebooks: $(VENV)/.installed
	$(PY) -m pytest tests/test_notebooks.py -m slow -n 0 -s -k statements_hold
