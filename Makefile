# make demo: the main job on the embedded default.   make test: the test suite.
# Both create .venv on first use: the CPU build of torch 2.13.0 first, by pip, which finds it
# (an unpinned torch would pull a multi-GB CUDA build), then emf-dist with its test extras by uv,
# which keeps that torch and fetches and installs the rest in parallel, in half pip's time
# (docs/benchmarks.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/emf demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

clean:
	rm -rf $(VENV)
