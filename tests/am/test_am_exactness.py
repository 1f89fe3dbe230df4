"""AM reproduces attention where it must (t = T, re-compaction, causal) and degrades gracefully below that."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_compact.am import CompactedHeads, HeadBatch, compact_heads

from .reference import (
    attend64,
    clustered_batch,
    compact_attention,
    original_attention,
    relative_errors,
)

AM_METHODS = ("am-highest-attention", "am-omp")
# Exactness runs: no hold-out (every query fits) and a vanishing value ridge.
EXACT = {"holdout_fraction": 0.0, "value_ridge": 1e-9}


def random_batch(heads: int, n_keys: int, n_queries: int, dim: int, seed: int, budget: int) -> HeadBatch:
    gen = torch.Generator().manual_seed(seed)
    return HeadBatch(
        keys=torch.randn(heads, n_keys, dim, generator=gen),
        values=torch.randn(heads, n_keys, dim, generator=gen),
        queries=1.5 * torch.randn(heads, n_queries, dim, generator=gen),
        scale=dim**-0.5,
        budget=torch.full((heads,), budget, dtype=torch.int64),
    )


def assert_matches(result: CompactedHeads, batch: HeadBatch, queries: torch.Tensor | None, tol: float) -> None:
    for h in range(batch.num_heads):
        q = None if queries is None else queries[h]
        out, lse = compact_attention(result, batch, h, q)
        out_ref, lse_ref = original_attention(batch, h, q)
        output_err, mass_err = relative_errors(out, lse, out_ref, lse_ref)
        assert output_err < tol and mass_err < tol, (h, output_err, mass_err)


@pytest.mark.parametrize("method", AM_METHODS)
def test_full_budget_reproduces_attention_on_new_queries(method: str) -> None:
    batch = random_batch(heads=3, n_keys=24, n_queries=96, dim=16, seed=1, budget=24)
    result = compact_heads(batch, method, **EXACT)
    assert not bool(result.fell_back.any())
    fresh = 1.5 * torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(7))
    assert_matches(result, batch, fresh, tol=2e-3)
    # w = 1 everywhere: the beta of every entry is 0
    assert torch.allclose(result.beta, torch.zeros_like(result.beta), atol=2e-3)


@pytest.mark.parametrize("method", AM_METHODS)
def test_full_budget_with_existing_bias_matches_biased_attention(method: str) -> None:
    batch = random_batch(heads=2, n_keys=20, n_queries=80, dim=16, seed=2, budget=20)
    batch.key_bias = torch.empty(2, 20).uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(3))
    result = compact_heads(batch, method, **EXACT)
    assert not bool(result.fell_back.any())
    fresh = 1.5 * torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(8))
    assert_matches(result, batch, fresh, tol=2e-3)
    for h in range(2):
        indices, _, beta, _ = result.head(h)
        assert torch.allclose(beta, batch.key_bias[h, indices], atol=2e-3)


@pytest.mark.parametrize("method", AM_METHODS)
def test_full_budget_causal_matches_masked_attention(method: str) -> None:
    batch = random_batch(heads=2, n_keys=16, n_queries=64, dim=8, seed=4, budget=16)
    # queries at positions 8..71 repeated: every key is seen by most queries, early queries see only a prefix
    batch.key_pos = torch.arange(16).expand(2, 16).clone()
    batch.query_pos = (torch.arange(64) % 24).expand(2, 64).clone()
    result = compact_heads(batch, method, **EXACT)
    assert not bool(result.fell_back.any())
    assert_matches(result, batch, None, tol=2e-3)


def test_compact_of_compact_matches_first_compaction() -> None:
    batch = clustered_batch(heads=2, n_keys=64, n_queries=256, dim=16, clusters=6, seed=5, budget=24)
    first = compact_heads(batch, "am-highest-attention", holdout_fraction=0.0)
    assert not bool(first.fell_back.any())
    # the first result becomes a span with existing beta; re-compacting it at full budget must reproduce it
    again = HeadBatch(
        keys=first.keys,
        values=first.values,
        queries=batch.queries,
        scale=batch.scale,
        budget=first.length,
        key_len=first.length,
        key_bias=torch.where(torch.isfinite(first.beta), first.beta, 0.0),
    )
    second = compact_heads(again, "am-omp", **EXACT)
    fresh = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(9))
    assert_matches(second, again, fresh, tol=3e-3)
    # and compacting it further to half tracks the biased attention far better than dropping beta would
    again.budget = first.length // 2
    third = compact_heads(again, "am-highest-attention", holdout_fraction=0.0)
    for h in range(2):
        out, lse = compact_attention(third, again, h, fresh[h])
        out_ref, lse_ref = original_attention(again, h, fresh[h])
        _, mass_err = relative_errors(out, lse, out_ref, lse_ref)
        indices, keys, _, values = third.head(h)
        _, lse_unbiased = attend64(fresh[h], keys, values, float(batch.scale))
        _, mass_err_unbiased = relative_errors(out, lse_unbiased, out_ref, lse_ref)
        assert mass_err < 0.5 * mass_err_unbiased


def mixture(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets from their local outputs and masses (float64)."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    return (wa[:, None] * out_a + wb[:, None] * out_b) / (wa + wb)[:, None]


@pytest.mark.parametrize("method", AM_METHODS)
def test_mixture_with_appended_tokens(method: str) -> None:
    """Compact span + uncompacted tail ~= attention over [span; tail], and beats eviction there."""
    span = clustered_batch(heads=2, n_keys=96, n_queries=384, dim=16, clusters=8, seed=11, budget=24)
    gen = torch.Generator().manual_seed(12)
    tail_keys = torch.randn(2, 16, 16, generator=gen)
    tail_values = torch.randn(2, 16, 16, generator=gen)
    am = compact_heads(span, method, holdout_fraction=0.0)
    evicted = compact_heads(span, "snapkv")
    full_budget = HeadBatch(**{**span.__dict__, "budget": torch.full((2,), 96)})
    exact = compact_heads(full_budget, method, **EXACT)
    for h in range(2):
        queries = span.queries[h]
        keys_all = torch.cat([span.keys[h], tail_keys[h]])
        values_all = torch.cat([span.values[h], tail_values[h]])
        full_out, _ = attend64(queries, keys_all, values_all, float(span.scale))
        tail_out, tail_lse = attend64(queries, tail_keys[h], tail_values[h], float(span.scale))
        span_out, span_lse = original_attention(span, h)

        def mixed_error(result: CompactedHeads) -> float:
            out, lse = compact_attention(result, span, h)
            mixed = mixture(out, lse, tail_out, tail_lse)
            # independent check of the identity: one softmax over [compact entries ; tail]
            _, keys, beta, values = result.head(h)
            joint, _ = attend64(
                queries, torch.cat([keys, tail_keys[h]]), torch.cat([values, tail_values[h]]), float(span.scale),
                torch.cat([beta.double(), torch.zeros(16, dtype=torch.float64)]),
            )
            assert torch.allclose(mixed, joint, atol=1e-9)
            # error bound: local output error + relative mass error x distance between the two local outputs
            out_gap = (out - span_out).norm(dim=1)
            mass_gap = torch.expm1(lse - span_lse).abs()
            bound = out_gap + mass_gap * (span_out - tail_out).norm(dim=1)
            assert bool(((mixed - full_out).norm(dim=1) <= bound + 1e-9).all())
            return float((mixed - full_out).norm() / full_out.norm())

        assert mixed_error(exact) < 2e-3
        am_error = mixed_error(am)
        assert am_error < 0.5 * mixed_error(evicted)
        assert am_error < 0.6


@pytest.mark.parametrize(("method", "with_mass"), [("am-highest-attention", False), ("am-omp", True)])
def test_error_falls_as_budget_grows(method: str, with_mass: bool) -> None:
    """Output error (and for OMP, which selects keys for the mass, the mean mass error) on fresh queries.

    Highest-attention keys from the same cluster are near-collinear mass columns, and the recipe's clamped least
    squares fits them loosely, so its mass error is not monotone in t; its output error is.
    """
    budgets = [2, 4, 8, 16, 32, 64]
    fresh = torch.randn(2, 128, 16, generator=torch.Generator().manual_seed(21))
    errors = []
    for budget in budgets:
        batch = clustered_batch(heads=2, n_keys=128, n_queries=512, dim=16, clusters=6, seed=20, budget=budget)
        result = compact_heads(batch, method, holdout_fraction=0.0)
        total = 0.0
        for h in range(2):
            out, lse = compact_attention(result, batch, h, fresh[h])
            out_ref, lse_ref = original_attention(batch, h, fresh[h])
            total += float((out - out_ref).norm() / out_ref.norm())
            if with_mass:
                total += float(torch.expm1(lse - lse_ref).abs().mean())
        errors.append(total / 2)
    for smaller, larger in zip(errors, errors[1:]):
        assert larger <= 1.1 * smaller + 2e-3, errors
    assert errors[-1] < 0.6 * errors[0], errors
    assert all(math.isfinite(e) for e in errors)
