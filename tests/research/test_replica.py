"""research.replica on the tiny model: keeping every key reproduces the full cache; evicting does not."""

from __future__ import annotations

import argparse

import pytest
import torch

from research.replica import Replica
from tests.reference_llama import ReferenceLlama
from vllm_compact.benchmarks.capture import load_model
from vllm_compact.models.registry import ensure_model


@pytest.fixture(scope="module")
def replica():
    model, tokenizer = load_model(ensure_model("tiny"))
    ids = torch.randint(3, 250, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    args = argparse.Namespace(recent=32, protected=4, max_queries=4096, answer_tokens=4)
    return Replica(model, ReferenceLlama(model), tokenizer, ids, 8, args)


@pytest.mark.parametrize(("method", "source"), [("am-highest-attention", "after"),
                                                ("am-highest-attention", "after+repeat"), ("snapkv", "repeat")])
def test_ratio_one_matches_the_full_cache(replica, method, source):
    """Budget = every key: [protected ; entries ; recent window] at the original positions is the full cache."""
    full, _ = replica.question_logits(replica.full)
    compacted, _ = replica.question_logits(replica.compacted_cache(method, 1.0, source))
    torch.testing.assert_close(compacted, full, atol=2e-4, rtol=1e-4)
    assert replica.answer(replica.compacted_cache(method, 1.0, source)) == replica.answer(replica.full)


def test_compaction_is_applied(replica):
    """At 8x the span really shrinks: the question's logits move (the check above could not pass vacuously)."""
    cache = replica.compacted_cache("recent", 8.0, "after")
    entries = cache[0].keys.shape[1] - replica.args.protected - replica.args.recent
    assert entries == -(-(200 - 8 - 32 - 4) // 8)
    full, _ = replica.question_logits(replica.full)
    compacted, _ = replica.question_logits(cache)
    assert float((compacted - full).abs().max()) > 1e-2
