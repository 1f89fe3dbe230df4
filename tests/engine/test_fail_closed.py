"""Fail closed: a compaction plan counts as done only when the worker reports it written.

The engine runs our scheduler with vLLM's stock CPU worker, whose model runner never executes a plan and sends no
report (what any path that skips our runner looks like to the scheduler): every plan is undone and the requests are
served exactly as stock vLLM serves them; under memory pressure (plans that gave their pages back at planning) the
requests are recomputed and still finish.
"""

from __future__ import annotations

import random

from tests.engine.conftest import run_scenario

BLOCK = 32
STOCK_WORKER = {"worker_cls": "vllm.v1.worker.cpu_worker.CPUWorker"}


def _prompt(n: int, seed: int, vocab: int = 250) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _same_as_stock(stock: dict, other: dict) -> None:
    for rid, rec in stock["requests"].items():
        got = other["requests"][rid]
        assert got["token_ids"] == rec["token_ids"], rid
        for a, b in zip(rec["logprobs"], got["logprobs"]):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < 1e-5


def test_plans_no_worker_reports_are_undone_and_the_requests_are_stock(tiny_model_path, tmp_path):
    engine = {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 1024}
    requests = [{"id": f"r{i}", "prompt_token_ids": _prompt(n, 70 + i), "max_tokens": 48, "logprobs": 3}
                for i, n in enumerate((300, 420))]
    stock = run_scenario({"model": tiny_model_path, "compaction": None, "engine": engine, "requests": requests},
                         tmp_path / "stock")
    compaction = {"trigger_tokens": 64, "recent_window_tokens": 32, "protected_initial_tokens": 1, "ratio": 4}
    unreported = run_scenario({"model": tiny_model_path, "compaction": compaction, "engine": engine,
                               "engine_override": STOCK_WORKER, "requests": requests}, tmp_path / "unreported")
    stats = unreported["stats"]
    assert stats["worker"] is None  # no compaction worker ran
    # Each request is planned until it has failed MAX_ROLLBACKS (3) times, then served uncompacted.
    assert stats["scheduler"]["rollbacks"] == stats["scheduler"]["plans"] == 3 * len(requests)
    assert stats["scheduler"]["pages_freed"] == 0 and stats["scheduler"]["tokens_compacted"] == 0
    for rid in stock["requests"]:
        assert unreported["requests"][rid]["events"] == []
        assert stats["max_physical"][rid] == stats["max_logical"][rid]  # the request kept its source pages
    _same_as_stock(stock, unreported)
    assert stats["free_final"] == stats["free_initial"]


def test_unwritten_plans_under_memory_pressure_recompute_their_requests(tiny_model_path, tmp_path):
    """Plans under memory pressure free their source pages at planning; unreported, each is counted lost and its
    request preempted and recomputed, the token of the step that read the lost span discarded: every request
    finishes with stock vLLM's tokens (stock preempts too, in this pool) and every page comes back."""
    engine = {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 1024, "num_gpu_blocks_override": 40}
    requests = [{"id": f"p{i}", "prompt_token_ids": _prompt(300 + 20 * i, 10 + i), "max_tokens": 100, "logprobs": 3}
                for i in range(6)]
    stock = run_scenario({"model": tiny_model_path, "compaction": None, "engine": engine, "requests": requests},
                         tmp_path / "stock")
    compaction = {"trigger_tokens": 4096, "recent_window_tokens": 32, "protected_initial_tokens": 1, "ratio": 8,
                  "memory_pressure": True}
    result = run_scenario({"model": tiny_model_path, "compaction": compaction, "engine": engine,
                           "engine_override": STOCK_WORKER, "requests": requests}, tmp_path / "unreported")
    stats = result["stats"]
    assert stats["scheduler"]["lost_plans"] > 0, "the scenario must compact under memory pressure"
    assert sum(stats["preemptions"].values()) >= stats["scheduler"]["lost_plans"]
    assert stats["scheduler"]["tokens_compacted"] == 0 and stats["scheduler"]["rollbacks"] == 0
    for rid in (r["id"] for r in requests):
        assert len(result["requests"][rid]["token_ids"]) == 100, rid
    _same_as_stock(stock, result)
    assert stats["free_final"] == stats["free_initial"]
