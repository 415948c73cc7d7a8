# Two entry points (see README): `make demo` and `make test`. Both create .venv with a
# Python >= 3.12 (scripts/find_python.sh) and install the package from pyproject.toml first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

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
