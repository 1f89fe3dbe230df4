"""Engine behaviour with compaction: stock when untriggered, pages accounted, physical length bounded."""

from __future__ import annotations

import math
import random

import pytest

from tests.engine.conftest import run_scenario

BLOCK = 32


def _prompt(n: int, seed: int, vocab: int = 250) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _requests(vocab: int) -> list[dict]:
    return [
        {"id": f"r{i}", "prompt_token_ids": _prompt(n, i, vocab), "max_tokens": 16, "logprobs": 3}
        for i, n in enumerate((300, 120, 500))
    ]


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_enabled_but_untriggered_is_stock(model, tiny_model_path, smollm2_path, tmp_path):
    path, vocab = (tiny_model_path, 250) if model == "tiny" else (smollm2_path, 40000)
    engine = {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 1024}
    stock = run_scenario({"model": path, "compaction": None, "engine": engine, "requests": _requests(vocab)},
                         tmp_path / "stock")
    enabled = run_scenario(
        {"model": path, "compaction": {"trigger_tokens": 100_000}, "engine": engine, "requests": _requests(vocab)},
        tmp_path / "enabled",
    )
    for rid, rec in stock["requests"].items():
        other = enabled["requests"][rid]
        assert other["events"] == []
        assert other["token_ids"] == rec["token_ids"], rid
        for a, b in zip(rec["logprobs"], other["logprobs"]):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < 1e-5
    assert enabled["stats"]["worker"]["compactions"] == 0


def _pressure_scenario(tiny_model_path: str, memory_pressure: bool) -> dict:
    return {
        "model": tiny_model_path,
        "compaction": {"trigger_tokens": 4096, "recent_window_tokens": 32, "protected_initial_tokens": 1,
                       "ratio": 8, "memory_pressure": memory_pressure},
        # 40 pages of 32 tokens; six requests need ~16 pages each uncompacted.
        "engine": {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 1024,
                   "num_gpu_blocks_override": 40},
        "requests": [
            {"id": f"p{i}", "prompt_token_ids": _prompt(300 + 20 * i, 10 + i), "max_tokens": 100,
             **({"abort_after_steps": 30} if i == 2 else {})}
            for i in range(6)
        ],
    }


def test_pages_return_after_preemption_and_abort(tiny_model_path, tmp_path):
    """Memory-pressure compaction off: vLLM preempts; with an abort too, every page comes back."""
    result = run_scenario(_pressure_scenario(tiny_model_path, memory_pressure=False), tmp_path)
    stats = result["stats"]
    assert sum(stats["preemptions"].values()) > 0, "the scenario must actually preempt"
    assert result["requests"]["p2"].get("aborted")
    assert stats["free_final"] == stats["free_initial"]


def test_memory_pressure_compacts_instead_of_preempting(tiny_model_path, tmp_path):
    result = run_scenario({**_pressure_scenario(tiny_model_path, memory_pressure=True), "flush_step": True}, tmp_path)
    stats = result["stats"]
    assert stats["scheduler"]["pressure_steps"] > 0
    assert stats["worker"]["compactions"] > 0
    assert sum(stats["preemptions"].values()) == 0
    assert stats["free_final"] == stats["free_initial"]
    # compaction state of finished (and aborted) requests is gone too: segments and query reservoirs (only the
    # flush request's own record may remain: it finished in the last step), so nothing stays outside the pool
    assert stats["worker"]["segments"] == 0
    assert stats["worker"]["records"] <= 1 and stats["worker"]["reservoirs"] <= 1
    assert stats["worker"]["outside_pool_bytes"] == (0 if stats["worker"]["reservoirs"] == 0 else
                                                     stats["worker"]["outside_pool_bytes"])
    assert stats["worker"]["outside_pool_bytes_peak"] > 0
    done = [r for r in result["requests"].values() if not r.get("aborted")]
    assert all(len(r["token_ids"]) == 100 for r in done)


def test_repeated_compaction_bounds_physical_length(tiny_model_path, tmp_path):
    """One generation 4x longer than the whole pool: re-compaction keeps it inside the pool."""
    pool_blocks = 10
    scenario = {
        "model": tiny_model_path,
        "compaction": {"trigger_tokens": 64, "recent_window_tokens": 32, "protected_initial_tokens": 1, "ratio": 16},
        "engine": {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 4096,
                   "num_gpu_blocks_override": pool_blocks},
        "requests": [{"id": "g", "prompt_token_ids": _prompt(100, 7), "max_tokens": 4 * pool_blocks * BLOCK}],
    }
    result = run_scenario(scenario, tmp_path)
    stats = result["stats"]
    record = result["requests"]["g"]
    assert len(record["token_ids"]) == 4 * pool_blocks * BLOCK
    assert stats["max_logical"]["g"] >= 4 * pool_blocks * BLOCK
    assert stats["preemptions"]["g"] == 0
    # head page + trigger + recent window + a page of slack + the compact pages, never the logical length.
    assert stats["max_physical"]["g"] <= (pool_blocks - 1) * BLOCK
    assert len(record["events"]) >= 8
    assert stats["free_final"] == stats["free_initial"]


def _every_method_scenario(tiny_model_path: str) -> dict:
    from vllm_compact.am import METHODS

    return {
        "model": tiny_model_path,
        "compaction": {"trigger_tokens": 64, "recent_window_tokens": 32, "protected_initial_tokens": 1, "ratio": 4},
        "engine": {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 1024},
        "requests": [
            {"id": method, "prompt_token_ids": _prompt(300, 20 + i), "max_tokens": 24, "logprobs": 1,
             "extra_args": {"kv_compaction_method": method, "kv_compaction_ratio": 4 + i}}
            for i, method in enumerate(METHODS)
        ],
        "flush_step": True,
    }


def test_every_registered_method_runs_through_the_engine(tiny_model_path, tmp_path):
    """Each method the config accepts, asked per request (with its own ratio), compacts (or, for `none`, keeps the
    request uncompacted) and finishes; every page returns."""
    from vllm_compact.am import method_class

    result = run_scenario(_every_method_scenario(tiny_model_path), tmp_path)
    stats = result["stats"]
    for method, record in result["requests"].items():
        assert len(record["token_ids"]) == 24, method
        compacted = bool(record["events"])
        assert compacted == method_class(method).compacts, method
        if compacted:
            block = stats["block_size"]
            event = record["events"][0]
            span = (event["end_block"] - event["start_block"]) * block
            lengths = [len(head[0]) for layer in event["layers"] for head in layer]
            assert max(lengths) <= round(span / (4 + list(result["requests"]).index(method))) + 1, method
    assert stats["worker"]["failures"] == 0
    assert stats["free_final"] == stats["free_initial"]


def test_failing_solves_never_lose_a_request(tiny_model_path, tmp_path):
    """Half the solves raise or return NaN (test-only fault switch): every request still finishes with finite
    log-probs, failures are counted, every page returns."""
    result = run_scenario(_every_method_scenario(tiny_model_path), tmp_path,
                          env={"VLLM_COMPACT_FAULTS": "rate=0.5,seed=1"})
    stats = result["stats"]
    assert stats["worker"]["faults_injected"] > 0
    # a failure is a compaction that needed a fallback; a fallback can be hit by a fault too
    assert 0 < stats["worker"]["failures"] <= stats["worker"]["faults_injected"]
    for method, record in result["requests"].items():
        assert len(record["token_ids"]) == 24, method
        assert all(math.isfinite(lp) for step in record["logprobs"] for lp in step.values()), method
    assert stats["free_final"] == stats["free_initial"]


def test_failing_page_reads_and_writes_never_lose_a_request(tiny_model_path, tmp_path):
    """Reading the source pages or writing the compact pages raises (half the time, test-only switch): the plan is
    retried alone, then undone; every request finishes with finite log-probs and every page returns."""
    result = run_scenario(_every_method_scenario(tiny_model_path), tmp_path,
                          env={"VLLM_COMPACT_FAULTS": "rate=0.5,seed=2,sites=gather+write"})
    stats = result["stats"]
    assert stats["worker"]["faults_injected"] > 0 and stats["worker"]["failures"] > 0
    assert stats["worker"]["compactions"] > 0
    for method, record in result["requests"].items():
        assert len(record["token_ids"]) == 24, method
        assert all(math.isfinite(lp) for step in record["logprobs"] for lp in step.values()), method
    assert stats["free_final"] == stats["free_initial"]


def test_a_compaction_that_always_fails_leaves_the_request_as_stock_vllm_serves_it(tiny_model_path, tmp_path):
    """Every solve, page read and page write raises: each plan is undone (the scheduler still held the source
    pages), the request goes on with its full KV, and its tokens and log-probs are stock vLLM's. After a few
    failures in a row the request is served without compaction."""
    engine = {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 1024}
    requests = [{"id": f"r{i}", "prompt_token_ids": _prompt(n, 40 + i), "max_tokens": 48, "logprobs": 3}
                for i, n in enumerate((300, 420))]
    stock = run_scenario({"model": tiny_model_path, "compaction": None, "engine": engine, "requests": requests},
                         tmp_path / "stock")
    compaction = {"trigger_tokens": 64, "recent_window_tokens": 32, "protected_initial_tokens": 1, "ratio": 4}
    failing = run_scenario({"model": tiny_model_path, "compaction": compaction, "engine": engine,
                            "requests": requests}, tmp_path / "failing",
                           env={"VLLM_COMPACT_FAULTS": "rate=1,seed=0,sites=solve+gather+write"})
    stats = failing["stats"]
    assert stats["worker"]["compactions"] == 0 and stats["worker"]["faults_injected"] > 0
    assert stats["scheduler"]["rollbacks"] == stats["scheduler"]["plans"] == 3 * len(requests)
    assert stats["scheduler"]["pages_freed"] == 0 and stats["scheduler"]["tokens_compacted"] == 0
    for rid, rec in stock["requests"].items():
        other = failing["requests"][rid]
        assert other["token_ids"] == rec["token_ids"], rid
        for a, b in zip(rec["logprobs"], other["logprobs"]):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < 1e-5
    assert stats["free_final"] == stats["free_initial"]


def test_compaction_waits_for_the_whole_prompt(tiny_model_path, tmp_path):
    """With pages to spare a chunked prompt is compacted once it is fully prefilled (its end, usually the question,
    is then among the reference queries); `compact_during_prefill` compacts between chunks."""
    prompt = _prompt(330, 3)
    engine = {"block_size": BLOCK, "max_num_batched_tokens": 128, "max_model_len": 1024}
    first_events = {}
    for during in (False, True):
        compaction = {"trigger_tokens": 64, "recent_window_tokens": 32, "protected_initial_tokens": 1, "ratio": 4,
                      "compact_during_prefill": during}
        result = run_scenario({"model": tiny_model_path, "compaction": compaction, "engine": engine,
                               "requests": [{"id": "r", "prompt_token_ids": prompt, "max_tokens": 8}]},
                              tmp_path / str(during))
        first_events[during] = result["requests"]["r"]["events"][0]["computed_before"]
        assert result["stats"]["free_final"] == result["stats"]["free_initial"]
    assert first_events[False] == len(prompt)
    assert first_events[True] < len(prompt)
