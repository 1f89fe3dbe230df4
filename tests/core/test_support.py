"""What compaction refuses at startup (core/support.py), on small config.json dicts and plain settings (no vLLM)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_compact.core.support import (
    UnsupportedSetting,
    kv_cache_dtype_refusals,
    model_refusals,
    parallel_refusals,
    raise_refusals,
)

LLAMA = {"model_type": "llama", "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
         "max_position_embeddings": 8192, "rope_theta": 10000.0}
# Qwen2.5 ships a sliding_window that use_sliding_window switches off (vLLM serves it with full attention).
QWEN25 = {"model_type": "qwen2", "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
          "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21}
QWEN3 = {"model_type": "qwen3", "sliding_window": None, "use_sliding_window": False,
         "layer_types": ["full_attention"] * 4}
MISTRAL_NO_WINDOW = {"model_type": "mistral", "sliding_window": None}
ZERO_WINDOW = {"model_type": "mistral", "sliding_window": 0}  # vLLM reads 0 as no window
GEMMA3_FULL = {"model_type": "gemma3_text", "sliding_window": None, "final_logit_softcapping": None,
               "attn_logit_softcapping": None}


@pytest.mark.parametrize("config", [LLAMA, QWEN25, QWEN3, MISTRAL_NO_WINDOW, ZERO_WINDOW, GEMMA3_FULL, None, {}],
                         ids=["llama", "qwen2.5", "qwen3", "mistral-no-window", "zero-window", "gemma3-no-window",
                              "no-config", "empty"])
def test_full_attention_models_pass(config):
    assert model_refusals(config) == []


def test_the_models_this_project_serves_pass():
    from vllm_compact.head_table import read_model_config
    from vllm_compact.models import registry

    for name in registry.MODELS:
        if registry.is_fetched(name):
            assert model_refusals(read_model_config(registry.model_path(name))) == [], name


# config.json -> fragments the reason must hold (the field and its value, what it is)
REFUSED = [
    ({"model_type": "mistral", "sliding_window": 4096}, ["sliding_window=4096", "sliding window attention"]),
    ({**QWEN25, "use_sliding_window": True}, ["sliding_window=32768", "sliding window attention"]),
    ({"model_type": "gemma2", "sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"],
      "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
     ["sliding_window=4096", "attn_logit_softcapping=50.0", "attention logit soft-capping"]),
    ({"model_type": "cohere2", "interleaved_sliding_window": 4096}, ["interleaved_sliding_window=4096"]),
    ({"model_type": "llama4_text", "attention_chunk_size": 8192}, ["attention_chunk_size=8192", "chunked local"]),
    ({"model_type": "gpt_oss", "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"]},
     ["model_type='gpt_oss'", "learned attention sinks", "sliding_window=128"]),
    ({"model_type": "granite", "attention_sinks": True}, ["attention_sinks=true", "learned attention sinks"]),
    ({"model_type": "qwen3_next", "layer_types": ["linear_attention", "full_attention"]},
     ["model_type='qwen3_next'", "layer_types ['linear_attention']", "hybrid"]),
    ({"model_type": "custom", "layer_types": ["full_attention", "mamba"]}, ["layer_types ['mamba']", "hybrid"]),
    ({"model_type": "jamba", "layers_block_type": ["attention", "mamba"]}, ["model_type='jamba'", "layers_block_type"]),
    ({"model_type": "nemotron_h", "hybrid_override_pattern": "M-M*-"}, ["hybrid_override_pattern"]),
    ({"model_type": "llava", "text_config": {"model_type": "mistral", "sliding_window": 4096}},
     ["sliding_window=4096"]),  # a multimodal model's text config
]


@pytest.mark.parametrize("config,fragments", REFUSED, ids=[c["model_type"] + str(i) for i, (c, _) in
                                                           enumerate(REFUSED)])
def test_what_compaction_does_not_match_is_refused_naming_the_field(config, fragments):
    reasons = model_refusals(config)
    assert reasons
    text = "\n".join(reasons)
    for fragment in fragments:
        assert fragment in text
    assert all(r.startswith("the model's config.json") for r in reasons)


def test_final_logit_softcapping_alone_is_accepted():
    """It caps the output logits, not attention's: nothing compaction approximates."""
    assert model_refusals({**LLAMA, "final_logit_softcapping": 30.0}) == []


def test_disable_sliding_window_accepts_a_window_but_not_the_rest():
    assert model_refusals({"model_type": "mistral", "sliding_window": 4096}, disable_sliding_window=True) == []
    gemma2 = {"model_type": "gemma2", "sliding_window": 4096, "attn_logit_softcapping": 50.0}
    assert [r for r in model_refusals(gemma2, disable_sliding_window=True) if "sliding" in r] == []
    assert model_refusals(gemma2, disable_sliding_window=True)


def test_parallelism_other_than_one_is_refused_naming_the_flag():
    assert parallel_refusals() == []
    assert parallel_refusals(tensor_parallel_size=1, pipeline_parallel_size=None, data_parallel_size=1) == []
    reasons = parallel_refusals(tensor_parallel_size=2, pipeline_parallel_size=4, data_parallel_size=2,
                                decode_context_parallel_size=2)
    assert [r.split(" ")[0] for r in reasons] == ["--tensor-parallel-size=2", "--pipeline-parallel-size=4",
                                                 "--data-parallel-size=2", "--decode-context-parallel-size=2"]
    assert "(tensor_parallel_size)" in reasons[0]  # the offline API's name too


@pytest.mark.parametrize("dtype", ["fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"])
def test_a_kv_cache_dtype_other_than_auto_is_refused(dtype):
    assert kv_cache_dtype_refusals("auto") == [] and kv_cache_dtype_refusals(None) == []
    (reason,) = kv_cache_dtype_refusals(dtype)
    assert reason.startswith(f"--kv-cache-dtype={dtype} (kv_cache_dtype)") and "auto" in reason


def test_refusals_raise_one_error_naming_every_reason():
    raise_refusals([])
    with pytest.raises(UnsupportedSetting, match="does not support") as err:
        raise_refusals(parallel_refusals(tensor_parallel_size=2) + kv_cache_dtype_refusals("fp8"))
    assert isinstance(err.value, ValueError)
    assert "--tensor-parallel-size=2" in str(err.value) and "--kv-cache-dtype=fp8" in str(err.value)


_OFFLINE = """
import json, os, sys
from vllm_compact.config import ENV_VAR, CompactionConfig
from vllm_compact.core.support import UnsupportedSetting
from vllm_compact.integration.settings import engine_kwargs
out = []
for kwargs in ({"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}, {"data_parallel_size": 2},
               {"kv_cache_dtype": "fp8"}):
    try:
        engine_kwargs(CompactionConfig(enabled=True), dtype="float32", **kwargs)
        out.append(None)
    except UnsupportedSetting as e:
        out.append(str(e))
print(json.dumps({"errors": out, "exported": ENV_VAR in os.environ,
                  "vllm_imported": any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)}))
"""


def test_the_offline_api_refuses_them_before_vllm_is_imported():
    proc = subprocess.run([sys.executable, "-c", _OFFLINE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    flags = ["--tensor-parallel-size=2", "--pipeline-parallel-size=2", "--data-parallel-size=2", "--kv-cache-dtype=fp8"]
    for error, flag in zip(got["errors"], flags):
        assert error is not None and flag in error
    assert got["exported"] is False and got["vllm_imported"] is False
