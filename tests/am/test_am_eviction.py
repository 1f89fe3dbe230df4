"""Eviction baselines keep exactly the keys they promise, with their original values and existing bias."""

from __future__ import annotations

import math

import torch

from vllm_compact.am import HeadBatch, compact_heads

from .reference import head_inputs, rms_scores64


def padded_batch(seed: int) -> HeadBatch:
    gen = torch.Generator().manual_seed(seed)
    return HeadBatch(
        keys=torch.randn(3, 30, 8, generator=gen),
        values=torch.randn(3, 30, 8, generator=gen),
        queries=2.0 * torch.randn(3, 20, 8, generator=gen),
        scale=8**-0.5,
        budget=torch.tensor([5, 1, 12]),
        key_len=torch.tensor([30, 9, 21]),
        query_len=torch.tensor([20, 7, 13]),
        key_bias=torch.randn(3, 30, generator=gen),
    )


def kept(result, h: int) -> list[int]:
    return result.head(h)[0].tolist()


def assert_eviction_form(result, batch: HeadBatch) -> None:
    for h in range(batch.num_heads):
        indices, keys, beta, values = result.head(h)
        assert torch.equal(keys, batch.keys[h, indices]) and torch.equal(values, batch.values[h, indices])
        assert torch.equal(beta, batch.key_bias[h, indices])
    assert not bool(result.fell_back.any())


def test_recent_keeps_the_last_budget_keys() -> None:
    batch = padded_batch(1)
    result = compact_heads(batch, "recent")
    for h, (length, budget) in enumerate(zip(batch.key_len.tolist(), batch.budget.tolist())):
        assert kept(result, h) == list(range(length - budget, length))
    assert_eviction_form(result, batch)


def test_recent_follows_key_positions_when_given() -> None:
    batch = padded_batch(2)
    gen = torch.Generator().manual_seed(3)
    batch.key_pos = torch.stack([torch.randperm(30, generator=gen) for _ in range(3)])
    batch.query_pos = torch.full((3, 20), 1000)
    result = compact_heads(batch, "recent")
    for h, (length, budget) in enumerate(zip(batch.key_len.tolist(), batch.budget.tolist())):
        positions = batch.key_pos[h, :length]
        newest = positions.argsort(descending=True)[:budget].sort().values.tolist()
        assert kept(result, h) == newest


def test_h2o_keeps_the_top_mean_attention_keys() -> None:
    batch = padded_batch(4)
    result = compact_heads(batch, "h2o")
    for h in range(3):
        inp = head_inputs(batch, h)
        scores = rms_scores64(inp["queries"], inp["keys"], inp["scale"], inp["bias"], "mean")
        expected = scores.topk(int(batch.budget[h])).indices.sort().values.tolist()
        assert kept(result, h) == expected
    assert_eviction_form(result, batch)


def test_snapkv_keeps_the_top_pooled_scores() -> None:
    batch = padded_batch(5)
    for reduce in ("rms", "max"):
        result = compact_heads(batch, "snapkv", reduce=reduce)
        for h in range(3):
            inp = head_inputs(batch, h)
            scores = rms_scores64(inp["queries"], inp["keys"], inp["scale"], inp["bias"], reduce)
            # max over the window of 7 neighbouring positions inside the span
            pooled = torch.stack([scores[max(0, j - 3) : j + 4].max() for j in range(len(scores))])
            best = pooled.topk(int(batch.budget[h])).values
            chosen = pooled[result.head(h)[0]]
            assert torch.allclose(chosen.sort().values, best.sort().values, rtol=1e-4)
        assert_eviction_form(result, batch)


def test_snapkv_pooling_spreads_a_single_peak() -> None:
    # one key dominates every query; with pooling its neighbours (within 3 positions) outrank far keys
    keys = torch.zeros(1, 20, 4)
    keys[0, 10] = torch.tensor([4.0, 0.0, 0.0, 0.0])
    keys[0, :, 1] = torch.linspace(0, 0.1, 20)
    queries = torch.tensor([[[3.0, 1.0, 0.0, 0.0]]]).expand(1, 6, 4).clone()
    batch = HeadBatch(keys=keys, values=torch.randn(1, 20, 4), queries=queries, scale=1.0, budget=torch.tensor([7]))
    assert compact_heads(batch, "snapkv").head(0)[0].tolist() == list(range(7, 14))
    unpooled = compact_heads(batch, "snapkv", pool_kernel=0).head(0)[0].tolist()
    assert 10 in unpooled and unpooled != list(range(7, 14))


def test_none_keeps_everything() -> None:
    batch = padded_batch(6)
    batch.budget = torch.tensor([100, 0, 3])  # ignored
    result = compact_heads(batch, "none")
    assert torch.equal(result.length, batch.key_len)
    for h, length in enumerate(batch.key_len.tolist()):
        assert kept(result, h) == list(range(length))
    assert_eviction_form(result, batch)
    assert bool(torch.isneginf(result.beta[1, 9:]).all()) and math.isinf(float(result.beta[2, 21]))


def test_eviction_without_bias_has_zero_beta() -> None:
    batch = padded_batch(7)
    batch.key_bias = None
    result = compact_heads(batch, "h2o")
    for h in range(3):
        assert torch.equal(result.head(h)[2], torch.zeros(int(batch.budget[h])))
    assert result.beta.dtype == torch.float32
