# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install browser test test-slow test-llama-cpp lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# an editable install leaves out the wheel's start-up hook that lets `lm_eval --model gptlab` work: add it
	$(PY) -c "import shutil, sysconfig; shutil.copy('gptlab-harness.pth', sysconfig.get_paths()['purelib'])"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check gptlab tests benchmarks examples gptlab_harness_hook.py setup.py

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

# llama.cpp against our GGUF files: llama-cpp-python builds from source (about 7 minutes on 2 cores, cached after).
# GGML_NATIVE=OFF: the native build's AMX path crashes on quantized files on some CPUs.
test-llama-cpp: install
	$(PY) -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -c constraints.txt llama-cpp-python
	$(PY) -m pytest -q -m slow tests/test_gguf.py

demo: install
	$(PY) examples/demo.py --out $(OUT)/demo

bench: install
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/qlora.py --checkpointing --loss-chunk 256
	$(PY) benchmarks/loss.py
	$(PY) benchmarks/loss.py --frozen

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
