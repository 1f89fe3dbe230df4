"""The engine's scheduler refuses, at startup, what compaction does not support (the offline LLM API meets no
`vllm-compact serve` checks): vLLM's scheduler is built by hand on the tiny model's config, no model runs."""

from __future__ import annotations

import pytest
import torch

from vllm_compact.vllm_compat import patch_vllm_version

patch_vllm_version()

from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from vllm_compact.config import ENV_VAR, CompactionConfig  # noqa: E402
from vllm_compact.core.support import UnsupportedSetting  # noqa: E402
from vllm_compact.integration.scheduler import CompactionScheduler  # noqa: E402

BLOCK = 16


def _scheduler(model_path: str, groups: str = "full", edit=None) -> CompactionScheduler:
    model = ModelConfig(model=model_path, max_model_len=2048, dtype="float32")
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
    cache.num_gpu_blocks = 64
    config = VllmConfig(model_config=model, cache_config=cache, scheduler_config=SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=256, max_model_len=2048, is_encoder_decoder=False))
    if edit is not None:
        edit(config)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(model.get_num_layers(config.parallel_config))]
    heads, size = model.get_num_kv_heads(config.parallel_config), model.get_head_size()
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads, head_size=size, dtype=torch.float32)
    window = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=heads, head_size=size, dtype=torch.float32,
                               sliding_window=64)
    kv_groups = {
        "full": [KVCacheGroupSpec(layers, full)],
        "sliding": [KVCacheGroupSpec(layers, window)],
        "hybrid": [KVCacheGroupSpec(layers[:2], full), KVCacheGroupSpec(layers[2:], window)],
    }[groups]
    kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=kv_groups)
    return CompactionScheduler(vllm_config=config, kv_cache_config=kv, block_size=BLOCK,
                               structured_output_manager=StructuredOutputManager(config))


@pytest.fixture
def compaction_on(monkeypatch):
    monkeypatch.setenv(ENV_VAR, CompactionConfig(enabled=True).to_env())


def _set(path: str, value):
    def edit(config):
        *parents, name = path.split(".")
        obj = config
        for parent in parents:
            obj = getattr(obj, parent)
        setattr(obj, name, value)
    return edit


CASES = {
    "tensor parallel": ({"edit": _set("parallel_config.tensor_parallel_size", 2)}, "--tensor-parallel-size=2"),
    "pipeline parallel": ({"edit": _set("parallel_config.pipeline_parallel_size", 2)}, "--pipeline-parallel-size=2"),
    "data parallel": ({"edit": _set("parallel_config.data_parallel_size", 2)}, "--data-parallel-size=2"),
    "fp8 KV cache": ({"edit": _set("cache_config.cache_dtype", "fp8")}, "--kv-cache-dtype=fp8"),
    "soft-capping": ({"edit": _set("model_config.hf_config.attn_logit_softcapping", 50.0)},
                     "attn_logit_softcapping=50.0"),
    "sinks": ({"edit": _set("model_config.hf_config.attention_sinks", True)}, "attention_sinks=true"),
    "sliding window config": ({"edit": _set("model_config.hf_config.sliding_window", 512)}, "sliding_window=512"),
    "sliding window KV cache": ({"groups": "sliding"}, "SlidingWindowSpec KV cache (sliding_window=64"),
    "hybrid": ({"groups": "hybrid"}, "2 KV cache groups (a hybrid model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_scheduler_refuses_at_startup_naming_the_setting(case, compaction_on, tiny_model_path):
    kwargs, fragment = CASES[case]
    with pytest.raises(UnsupportedSetting) as err:
        _scheduler(tiny_model_path, **kwargs)
    assert fragment in str(err.value)
    assert str(err.value).startswith("KV compaction does not support this setup")


def test_a_supported_setup_starts_and_compaction_off_refuses_nothing(compaction_on, tiny_model_path, monkeypatch):
    assert _scheduler(tiny_model_path).compaction_active
    monkeypatch.setenv(ENV_VAR, CompactionConfig(enabled=False).to_env())
    assert not _scheduler(tiny_model_path, groups="hybrid").compaction_active  # stock vLLM, untouched
