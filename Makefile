# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install browser test test-slow lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check gptlab tests benchmarks examples

# The playground's browser test drives Debian's headless Chromium; installed here when missing and possible.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "note: chromium is not installed; the playground's browser test will be skipped"

test: install browser lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) examples/demo.py --out $(OUT)/demo

bench: install
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
