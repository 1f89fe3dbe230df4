"""vLLM's prefix caching stays on with compaction, and no request ever reads KV computed under another compaction
history: blocks written after a request's first compaction and compact pages are never prefix blocks; the blocks a
compaction frees stay cached, so a later request with the same prefix hits them; a request with compaction off gets
what stock vLLM (prefix caching on) gives it."""

from __future__ import annotations

import random

from tests.engine.conftest import run_scenario

BLOCK = 32
ENGINE = {"block_size": BLOCK, "max_num_batched_tokens": 256, "max_model_len": 2048, "enable_prefix_caching": True}
# Compacts during its prompt's prefill (after the first 256-token chunk), so the rest of the prompt is written over
# the compacted context: fixed tokens that another request can share.
COMPACTION = {"trigger_tokens": 128, "recent_window_tokens": 32, "protected_initial_tokens": 1, "ratio": 4,
              "method": "am-highest-attention", "compact_during_prefill": True}
OFF = {"kv_compaction_enabled": False}


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


DOCUMENT = _tokens(400, 1)  # a shared context (system prompt, document): 12 full blocks


def _requests() -> list[dict]:
    # (no prompt log-probs: vLLM does not read the prefix cache for a request that asks for them)
    return [
        {"id": "first", "prompt_token_ids": DOCUMENT + _tokens(20, 2), "max_tokens": 48, "logprobs": 2},
        # another user, the whole document, compaction off
        {"id": "other", "prompt_token_ids": DOCUMENT + _tokens(24, 3), "max_tokens": 24, "logprobs": 2,
         "extra_args": OFF, "after": "first"},
        # a third, sharing only the document's first 200 tokens (written before the first request compacted)
        {"id": "short", "prompt_token_ids": DOCUMENT[:200] + _tokens(40, 4), "max_tokens": 24, "logprobs": 2,
         "extra_args": OFF, "after": "other"},
    ]


def _close(a: list[dict], b: list[dict], tol: float) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and max(abs(x[t] - y[t]) for t in x) <= tol
                                    for x, y in zip(a, b))


def test_prefix_caching_with_compaction_matches_stock_and_never_shares_compacted_kv(tiny_model_path, tmp_path):
    stock = run_scenario({"model": tiny_model_path, "compaction": None, "engine": ENGINE, "requests": _requests()},
                         tmp_path / "stock")
    ours = run_scenario({"model": tiny_model_path, "compaction": COMPACTION, "engine": ENGINE,
                         "requests": _requests()}, tmp_path / "compaction")
    got, want = ours["requests"], stock["requests"]

    assert got["first"]["events"], "the scenario must compact the first request"
    compacted_at = got["first"]["events"][0]["computed_before"]
    assert 200 <= compacted_at < len(DOCUMENT), "it must compact in the middle of the document"
    # Invariant, checked after every step: no compact page and no block written after a compaction was cached.
    assert ours["stats"]["prefix_violations"] == []

    # The whole document: stock hits all of its blocks; we hit only those written before the compaction (kept as
    # cached blocks when the compaction freed them) and compute the rest, so the answer is stock's.
    document_blocks = len(DOCUMENT) // BLOCK * BLOCK
    assert want["other"]["num_cached_tokens"] == document_blocks
    assert got["other"]["num_cached_tokens"] == compacted_at // BLOCK * BLOCK
    assert got["other"]["token_ids"] == want["other"]["token_ids"]
    assert _close(got["other"]["logprobs"], want["other"]["logprobs"], 1e-4)

    # A prefix written before the compaction is shared as in stock vLLM, and the answer is exactly stock's.
    assert got["short"]["num_cached_tokens"] == want["short"]["num_cached_tokens"] == 200 // BLOCK * BLOCK
    assert got["short"]["token_ids"] == want["short"]["token_ids"]
    assert _close(got["short"]["logprobs"], want["short"]["logprobs"], 0.0)

    # Nothing leaked: every page is back in the pool (cached blocks count as free).
    assert ours["stats"]["free_final"] == ours["stats"]["free_initial"]
