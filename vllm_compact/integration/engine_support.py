"""The engine's own check of what compaction supports (core/support.py), on the configuration vLLM resolved: the
offline `LLM` API gets here without `vllm-compact serve`'s checks, and only the engine knows the KV cache groups."""

from __future__ import annotations

from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_compact.core.support import (
    PARALLEL_SETTINGS,
    kv_cache_dtype_refusals,
    model_refusals,
    parallel_refusals,
    raise_refusals,
)


def engine_refusals(vllm_config, kv_cache_config) -> list[str]:
    parallel = vllm_config.parallel_config
    reasons = parallel_refusals(**{name: getattr(parallel, name, 1) for _, name, _ in PARALLEL_SETTINGS})
    reasons += kv_cache_dtype_refusals(vllm_config.cache_config.cache_dtype)
    model = vllm_config.model_config
    hf = getattr(model, "hf_config", None)
    reasons += model_refusals(hf.to_dict() if hf is not None else None,
                              disable_sliding_window=bool(getattr(model, "disable_sliding_window", False)))
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        reasons.append(f"vLLM gives this model {len(groups)} KV cache groups (a hybrid model: layers of different "
                       "attention kinds or state-space layers): KV compaction supports full-attention models only")
    else:
        spec = groups[0].kv_cache_spec
        if type(spec) is not FullAttentionSpec or spec.sliding_window is not None or spec.attention_chunk_size:
            reasons.append(f"vLLM gives this model a {type(spec).__name__} KV cache (sliding_window="
                           f"{getattr(spec, 'sliding_window', None)}, attention_chunk_size="
                           f"{getattr(spec, 'attention_chunk_size', None)}): KV compaction supports plain full "
                           "attention only")
    return list(dict.fromkeys(reasons))


def check_engine_supported(vllm_config, kv_cache_config) -> None:
    """Raise UnsupportedSetting (a ValueError) naming every unsupported setting."""
    raise_refusals(engine_refusals(vllm_config, kv_cache_config))
