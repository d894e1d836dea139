# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install test test-slow lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check gptlab tests benchmarks examples

test: install lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) examples/demo.py --out $(OUT)/demo

bench: install
	$(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
