"""Bad per-request compaction values through the offline engine: `LLM.generate` refuses them before the engine core
sees them (vLLM's validate_params admission hook), and a request that reaches the core anyway is served
uncompacted without stopping the engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from vllm.sampling_params import SamplingParams

from vllm_compact.config import ENV_VAR, CompactionConfig
from vllm_compact.integration.request_validation import CompactionParamsError, CompactionRequestValidator

SERVER = CompactionConfig(enabled=True, ratio=8.0, trigger_tokens=64, recent_window_tokens=32, pool_watermark=1.0)

BAD = [
    ({"kv_compaction_ratio": "x"}, "vllm_xargs.kv_compaction_ratio", "a string, not a number"),
    ({"kv_compaction_ratio": True}, "vllm_xargs.kv_compaction_ratio", "a boolean, not a number"),
    ({"kv_compaction_ratio": float("inf")}, "vllm_xargs.kv_compaction_ratio", "not a finite number"),
    ({"kv_compaction_ratio": 2}, "vllm_xargs.kv_compaction_ratio", "looser than this server's ratio 8.0"),
    ({"KV_Compaction_Ratio": 20}, "vllm_xargs.KV_Compaction_Ratio", "did you mean 'kv_compaction_ratio'"),
    ({"kv_compaction_method": "zip"}, "vllm_xargs.kv_compaction_method", "not a compaction method"),
    ({"kv_compaction_enabled": "no"}, "vllm_xargs.kv_compaction_enabled", "not a boolean"),
    ([1, 2], "vllm_xargs", "must be an object"),
]


@pytest.mark.parametrize("extra, param, fragment", BAD, ids=[repr(b[0]) for b in BAD])
def test_admission_hook_raises_vllms_validation_error_naming_the_key(monkeypatch, extra, param, fragment):
    monkeypatch.setenv(ENV_VAR, SERVER.to_env())
    params = SamplingParams(max_tokens=2)
    params.extra_args = extra  # SamplingParams' own checks would stop a list earlier; the hook must not rely on that
    with pytest.raises(CompactionParamsError) as info:
        CompactionRequestValidator.validate_params(params)
    assert info.value.parameter == param and fragment in str(info.value)


def test_admission_hook_passes_valid_and_foreign_keys_and_is_inert_without_compaction(monkeypatch):
    monkeypatch.setenv(ENV_VAR, SERVER.to_env())
    for extra in (None, {}, {"kv_compaction_ratio": 16, "kv_compaction_method": "snapkv"}, {"other_ext": [1, "a"]}):
        CompactionRequestValidator.validate_params(SamplingParams(max_tokens=2, extra_args=extra))
    monkeypatch.delenv(ENV_VAR)
    CompactionRequestValidator.validate_params(SamplingParams(max_tokens=2, extra_args={"kv_compaction_ratio": "x"}))


_RUNNER = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm_compact.vllm_compat import patch_vllm_version
patch_vllm_version()

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm_compact.config import CompactionConfig
    from vllm_compact.integration.settings import engine_kwargs
    from vllm_compact.models.registry import ensure_model

    bad = json.loads(sys.argv[1])
    config = CompactionConfig.model_validate_json(sys.argv[2])
    llm = LLM(model=str(ensure_model("tiny")), dtype="float32", enforce_eager=True, block_size=32,
              max_model_len=2048, **engine_kwargs(config))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    long_prompt = " ".join(f"w{j % 50}" for j in range(300))  # ~770 tokens: far past trigger + recent window

    def plans():
        return scheduler.compaction_stats.plans

    out = {"refused": []}
    for extra in bad:
        try:
            llm.generate([long_prompt], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
            out["refused"].append(None)
        except Exception as e:
            out["refused"].append({"type": [c.__name__ for c in type(e).__mro__], "message": str(e),
                                   "parameter": getattr(e, "parameter", None)})
    out["plans_after_refusals"] = plans()
    out["running_after_refusals"] = len(scheduler.running) + len(scheduler.waiting)

    ok = llm.generate([long_prompt], SamplingParams(max_tokens=4, ignore_eos=True,
                                                    extra_args={"kv_compaction_ratio": 20}), use_tqdm=False)
    out["valid_tokens"] = len(ok[0].outputs[0].token_ids)
    out["plans_after_valid"] = plans()

    # An engine-level caller that bypasses the admission hook (a prepared EngineCoreRequest is not validated
    # again by vLLM): the scheduler cannot read the value and must serve the request without compaction.
    request = engine.input_processor.process_inputs("bypass", long_prompt,
                                                    SamplingParams(max_tokens=4, ignore_eos=True),
                                                    supported_tasks=engine.get_supported_tasks())
    request.sampling_params.extra_args = {"kv_compaction_ratio": "x"}
    engine.add_request(request.request_id, request, request.sampling_params)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    out["bypass_tokens"] = [len(o.outputs[0].token_ids) for o in finished]
    out["plans_after_bypass"] = plans()
    again = llm.generate([long_prompt], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    out["after_bypass_tokens"] = len(again[0].outputs[0].token_ids)
    out["plans_at_end"] = plans()
    print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> dict:
    bad = [extra for extra, _, _ in BAD if isinstance(extra, dict) and extra != {"kv_compaction_ratio": float("inf")}]
    bad.append([1, 2])  # not an object
    script = tmp_path_factory.mktemp("offline") / "runner.py"
    script.write_text(_RUNNER)
    proc = subprocess.run([sys.executable, str(script), json.dumps(bad), SERVER.to_env()], capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return {"bad": bad, **json.loads(lines[-1].removeprefix("RESULT "))}


def test_llm_generate_refuses_each_bad_value_naming_the_key(offline):
    expected = {json.dumps(extra): (param, fragment) for extra, param, fragment in BAD}
    for extra, refused in zip(offline["bad"], offline["refused"]):
        assert refused is not None, f"LLM.generate accepted {extra}"
        param, fragment = expected[json.dumps(extra)]
        # vLLM 0.32's request-validation error (what its own SamplingParams checks raise too).
        assert "VLLMValidationError" in refused["type"]
        assert refused["parameter"] == param and fragment in refused["message"]
    assert offline["plans_after_refusals"] == 0 and offline["running_after_refusals"] == 0  # none reached the core


def test_engine_keeps_serving_and_compacting_after_refusals(offline):
    assert offline["valid_tokens"] == 4 and offline["plans_after_valid"] >= 1


def test_a_bad_value_that_bypasses_the_hook_is_served_uncompacted_and_the_engine_lives(offline):
    assert offline["bypass_tokens"] == [4]
    assert offline["plans_after_bypass"] == offline["plans_after_valid"]  # ~770 tokens, yet no compaction
    assert offline["after_bypass_tokens"] == 3 and offline["plans_at_end"] > offline["plans_after_bypass"]
