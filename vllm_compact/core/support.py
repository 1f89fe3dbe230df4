"""What KV compaction is tested with, and the refusal of everything else before it can serve a request.

Compaction is covered by tests on one worker (no tensor, pipeline, context or data parallelism), on models whose
every layer is plain full softmax attention (no sliding window, chunked local attention, attention logit
soft-capping, learned attention sinks, no state-space or linear-attention layers), with the KV cache in the
model's dtype. Anything else is refused: `vllm-compact serve` exits 2 before vLLM loads the model (from its flags
and the model's config.json), and the engine's scheduler raises at startup (offline `LLM` API, or what the command
line could not see). Each reason names the flag or config.json field.

Engine-independent: plain values and config.json dicts in, reasons out.
"""

from __future__ import annotations

# (flag, keyword argument of vllm.LLM / EngineArgs, why it is refused)
PARALLEL_SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("--tensor-parallel-size", "tensor_parallel_size",
     "each worker would hold a shard of the KV heads while one report settles the plans"),
    ("--pipeline-parallel-size", "pipeline_parallel_size",
     "each stage would hold a share of the layers while one report settles the plans"),
    ("--data-parallel-size", "data_parallel_size",
     "the engines would overwrite one another's compaction stats file"),
    ("--decode-context-parallel-size", "decode_context_parallel_size", "the KV of one request would be split"),
    ("--prefill-context-parallel-size", "prefill_context_parallel_size", "the KV of one request would be split"),
)
ADVICE = "or serve without --kv-compaction"

# Model types whose layers are not all attention (state-space, linear attention, convolutions), by config.json's
# model_type (the engine also refuses any model vLLM gives more than one KV cache group or a non-full-attention one).
HYBRID_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "nemotron_h",
    "granitemoehybrid", "qwen3_next", "plamo2", "minimax", "minimax_m1", "minimax_text_01", "lfm2", "lfm2_moe",
    "kimi_linear", "rwkv", "rwkv7", "recurrent_gemma",
})
# Model types whose attention adds learned per-head sink logits to the softmax.
SINK_MODEL_TYPES = frozenset({"gpt_oss"})
SINK_KEYS = ("attention_sinks", "add_swa_attention_sink_bias", "add_full_attention_sink_bias",
             "swa_attention_sink_enabled")
FULL_LAYER_TYPES = frozenset({"full_attention", "attention", "global", "global_attention", "full"})


class UnsupportedSetting(ValueError):
    """A setting or model feature KV compaction is not tested with; the message names each one."""


def parallel_refusals(**sizes: int | None) -> list[str]:
    """`sizes`: tensor_parallel_size=..., etc. (vLLM's names; None or absent means 1)."""
    reasons = []
    for flag, name, why in PARALLEL_SETTINGS:
        size = sizes.get(name)
        if size is not None and int(size) != 1:
            reasons.append(f"{flag}={size} ({name}): KV compaction supports 1 only ({why}); run with {flag} 1 "
                           f"{ADVICE}")
    return reasons


def kv_cache_dtype_refusals(kv_cache_dtype: str | None) -> list[str]:
    if kv_cache_dtype in (None, "auto"):
        return []
    return [f"--kv-cache-dtype={kv_cache_dtype} (kv_cache_dtype): KV compaction writes compact keys and values in "
            f"the model's dtype; run with --kv-cache-dtype auto {ADVICE}"]


def _sections(config: dict) -> list[dict]:
    """The config and the text model's config of a multimodal model."""
    text = config.get("text_config")
    return [config, text] if isinstance(text, dict) else [config]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def model_refusals(config: dict | None, disable_sliding_window: bool = False) -> list[str]:
    """Why a model (its config.json as a dict; vLLM's hf_config.to_dict() alike) cannot be served with compaction;
    [] when it can. `disable_sliding_window`: vLLM's --disable-sliding-window (sliding layers become full ones)."""
    if not config:
        return []
    where = "the model's config.json"
    reasons = []
    for section in _sections(config):
        model_type = section.get("model_type")
        if model_type in HYBRID_MODEL_TYPES:
            reasons.append(f"{where} has model_type={model_type!r} (layers that are not attention: a hybrid or "
                           f"state-space model): KV compaction supports full-attention models only; serve it "
                           f"without --kv-compaction")
        layer_types = section.get("layer_types")
        other = sorted({t for t in layer_types if isinstance(t, str) and t not in FULL_LAYER_TYPES
                        and "sliding" not in t}) if isinstance(layer_types, list) else []
        if other:
            reasons.append(f"{where} has layer_types {other} (a hybrid model): KV compaction supports "
                           f"full-attention models only; serve it without --kv-compaction")
        for key in ("layers_block_type", "hybrid_override_pattern"):
            value = section.get(key)
            if isinstance(value, (list, str)) and any("mamba" in str(v).lower() or v == "M" for v in value):
                reasons.append(f"{where} has {key} with state-space layers (a hybrid model): KV compaction "
                               f"supports full-attention models only; serve it without --kv-compaction")
        if not disable_sliding_window:
            reasons += _sliding_window_refusals(section, where)
        if _positive(section.get("attention_chunk_size")):
            reasons.append(f"{where} sets attention_chunk_size={section['attention_chunk_size']} (chunked local "
                           f"attention): KV compaction supports full attention only; serve it without --kv-compaction")
        if _positive(section.get("attn_logit_softcapping")):
            reasons.append(f"{where} sets attn_logit_softcapping={section['attn_logit_softcapping']} (attention "
                           f"logit soft-capping): KV compaction matches plain softmax attention only; serve it "
                           f"without --kv-compaction")
        sinks = [key for key in SINK_KEYS if section.get(key) is True]
        if model_type in SINK_MODEL_TYPES or sinks:
            named = f"sets {sinks[0]}=true" if sinks else f"has model_type={model_type!r}"
            reasons.append(f"{where} {named} (learned attention sinks): KV compaction matches plain softmax "
                           f"attention only; serve it without --kv-compaction")
    return list(dict.fromkeys(reasons))


def _sliding_window_refusals(section: dict, where: str) -> list[str]:
    """vLLM applies a sliding window when the config sets a positive one (0 and null mean none) that
    use_sliding_window, where present, does not switch off (Qwen2 ships sliding_window with use_sliding_window
    false)."""
    if section.get("use_sliding_window") is False:
        return []
    for key in ("sliding_window", "interleaved_sliding_window"):
        if _positive(section.get(key)):
            return [f"{where} sets {key}={section[key]} (sliding window attention): KV compaction supports full "
                    f"attention only; serve it with --disable-sliding-window (vLLM then caps the context at the "
                    f"window) {ADVICE}"]
    return []


def refusal_message(reasons: list[str]) -> str:
    return "KV compaction does not support this setup:\n  " + "\n  ".join(reasons)


def raise_refusals(reasons: list[str]) -> None:
    if reasons:
        raise UnsupportedSetting(refusal_message(reasons))
