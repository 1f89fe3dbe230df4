"""The README's `make serve`, run exactly as a user runs it: the Makefile target, the user's environment (no KV size
pinned: the server sizes it from what the machine has), the default model in its served dtype (bf16), default
compaction settings. A needle prompt long enough to trigger compaction keeps its answer, and the stats say it was
compacted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import requests
from transformers import AutoTokenizer

from tests.serving.live_server import LiveServer, _wait_ready, free_port
from vllm_compact.benchmarks.reliability.server import stop_server
from vllm_compact.data.needle import make_needle_prompt
from vllm_compact.models.registry import ensure_model

ROOT = Path(__file__).resolve().parents[2]
# A needle in the first third of a ~2K-token prompt: inside the span compaction replaces (trigger 1024, recent 256).
CONTEXT_TOKENS, DEPTH, SEED = 2000, 0.25, 1


def test_make_serve_compacts_a_long_prompt_and_keeps_its_answer(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    log_path = tmp_path / "make-serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(["make", "-C", str(ROOT), "serve", f"PORT={port}"], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{port}", log_path, process)
    try:
        _wait_ready(server)
        log = log_path.read_text(errors="replace")
        assert "no KV cache size given; using" in log
        assert "head budgets: calibrated table shipped for smollm2-135m" in log
        assert "dtype=torch.bfloat16" in log
        model = requests.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        assert model == "smollm2-135m"  # the name `make serve` serves, what a client sends
        tokenizer = AutoTokenizer.from_pretrained(ensure_model("smollm2-135m"))
        needle = make_needle_prompt(tokenizer, CONTEXT_TOKENS, DEPTH, "number", seed=SEED)

        def complete(xargs: dict | None) -> dict:
            body = {"model": model, "prompt": needle.prompt, "max_tokens": 24, "temperature": 0}
            reply = requests.post(f"{server.base_url}/v1/completions", timeout=600,
                                  json=body if xargs is None else {**body, "vllm_xargs": xargs})
            assert reply.status_code == 200, reply.text
            return reply.json()

        full = complete({"kv_compaction_enabled": False})
        roomy = complete(None)  # the pool is nearly empty: compacting would cost a solve and buy nothing
        assert roomy["usage"]["kv_compaction"]["compactions"] == 0
        compacted = complete({"kv_compaction_pool_watermark": 1})  # this request asks to compact anyway
        assert needle.is_answered_by(full["choices"][0]["text"]), full["choices"][0]["text"]
        assert full["usage"]["kv_compaction"]["compactions"] == 0
        assert needle.is_answered_by(compacted["choices"][0]["text"]), compacted["choices"][0]["text"]
        usage = compacted["usage"]["kv_compaction"]
        assert usage["compactions"] == 1
        assert usage["logical_tokens"] >= needle.context_tokens
        assert usage["physical_tokens"] < usage["logical_tokens"] / 2
        stats = requests.get(f"{server.base_url}/v1/compaction/stats", timeout=30).json()
        assert stats["worker"]["compactions"] == 1 and stats["worker"]["failures"] == 0
        config = requests.get(f"{server.base_url}/v1/compaction/config", timeout=30).json()
        assert config["config"]["enabled"] and config["config"]["ratio"] == 10
        assert config["config"]["refit_values"] is False and config["config"]["distinct_share"] == 0.25
    finally:
        stop_server(process)
    assert process.poll() is not None
