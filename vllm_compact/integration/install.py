"""Installs the compaction pieces into vLLM in the current process (called from the plugin entry point)."""

from __future__ import annotations

import logging

from vllm_compact.config import CompactionConfig

logger = logging.getLogger("vllm_compact")
_INSTALLED = False


def _allow_pool_smaller_than_max_model_len() -> None:
    """A compacting engine can hold a request whose logical length exceeds the pool, so vLLM's start-up check
    that the pool holds one max_model_len request becomes a warning (an empty pool is still an error)."""
    from vllm.v1.core import kv_cache_utils

    original = kv_cache_utils._check_enough_kv_cache_memory

    def check(available_memory, get_needed_memory, max_model_len, estimate_max_model_len):
        if available_memory <= 0:
            return original(available_memory, get_needed_memory, max_model_len, estimate_max_model_len)
        if get_needed_memory() > available_memory:
            logger.warning(
                "vllm-compact: the KV pool cannot hold one uncompacted request of max_model_len=%d; "
                "relying on compaction to keep requests within the pool",
                max_model_len,
            )

    kv_cache_utils._check_enough_kv_cache_memory = check


def install(config: CompactionConfig) -> None:
    global _INSTALLED
    if _INSTALLED or not config.enabled:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "vllm_compact.integration.attention_backend.CompactionCPUAttentionBackend")
    _allow_pool_smaller_than_max_model_len()
    _INSTALLED = True
