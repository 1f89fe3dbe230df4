"""`vllm-compact serve` with no memory setting sizes the CPU KV cache from the node's available memory."""

from __future__ import annotations

import argparse

from vllm_compact.server import memory
from vllm_compact.server.memory import GiB, default_kv_cache_bytes, user_set_memory


def test_default_is_a_share_of_available_within_bounds():
    assert default_kv_cache_bytes(7 * GiB) == int(0.4 * 7 * GiB)
    assert default_kv_cache_bytes(GiB // 4) == GiB // 2  # a tiny node still gets a usable pool
    assert default_kv_cache_bytes(200 * GiB) == 8 * GiB
    # what vLLM's CPU worker then checks: the explicit size fits in what is available
    for available in (2 * GiB, 7 * GiB, 10 * GiB, 64 * GiB):
        assert default_kv_cache_bytes(available) < available


def test_any_user_setting_wins():
    assert user_set_memory(["--kv-cache-memory-bytes", "1000"], {})
    assert user_set_memory(["--gpu-memory-utilization=0.5"], {})
    assert user_set_memory([], {"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert not user_set_memory(["--port", "8000"], {})


def test_applied_on_cpu_without_settings(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(memory, "node_available_bytes", lambda: 5 * GiB)
    args = argparse.Namespace(kv_cache_memory_bytes=None)
    assert memory.apply_cpu_kv_cache_default(args, ["model"]) == 2 * GiB
    assert args.kv_cache_memory_bytes == 2 * GiB
    args = argparse.Namespace(kv_cache_memory_bytes=123)
    assert memory.apply_cpu_kv_cache_default(args, ["model", "--kv-cache-memory-bytes", "123"]) is None
    assert args.kv_cache_memory_bytes == 123
