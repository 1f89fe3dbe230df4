"""Budget helpers and the float64 held-out error metric."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_compact.am import CompactedHeads, attention_errors, compact_heads, proportional_budgets, uniform_budgets

from .reference import attend64, clustered_batch


def test_uniform_budgets() -> None:
    key_len = torch.tensor([4096, 100, 7, 1, 15])
    assert uniform_budgets(key_len, 10.0).tolist() == [410, 10, 1, 1, 2]
    assert uniform_budgets(key_len, 1.0).tolist() == key_len.tolist()
    with pytest.raises(ValueError):
        uniform_budgets(key_len, 0.0)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 400), min_size=1, max_size=12),
    weights=st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12),
    fill=st.floats(0.0, 1.2),
)
def test_proportional_budgets_respect_bounds_and_total(lengths: list[int], weights: list[float], fill: float) -> None:
    heads = len(lengths)
    key_len = torch.tensor(lengths)
    proportions = torch.tensor(weights[:heads], dtype=torch.float64)
    cap = [max(1, math.floor(0.75 * n)) for n in lengths]
    total = max(1, round(fill * sum(cap)))
    budget = proportional_budgets(proportions, key_len, total)
    assert budget.dtype == torch.int64
    assert all(1 <= b <= c for b, c in zip(budget.tolist(), cap))
    if heads <= total <= sum(cap):
        assert int(budget.sum()) == total
    elif total > sum(cap):
        assert budget.tolist() == cap
    else:
        assert budget.tolist() == [1] * heads


def test_proportional_budgets_follow_proportions_and_water_fill_the_excess() -> None:
    proportions = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # uncapped: budget = p * total exactly
    assert proportional_budgets(proportions, torch.full((4,), 1000), 200).tolist() == [20, 40, 60, 80]
    key_len = torch.tensor([1000, 1000, 1000, 100])
    # head 3 wants 400 but its cap is 75: the other 325 go to heads 0-2 in proportion 1:2:3
    # (925 x 1/6, 2/6, 3/6 = 154.2, 308.3, 462.5; the one unit left by flooring goes to the largest remainder)
    assert proportional_budgets(proportions, key_len, 1000).tolist() == [154, 308, 463, 75]


def plain_errors(keys, values, bias, compact_keys, compact_beta, compact_values, queries, scale):
    out, lse = attend64(queries, keys, values, scale, bias)
    out_c, lse_c = attend64(queries, compact_keys, compact_values, scale, compact_beta)
    output = float((out_c - out).norm() / out.norm())
    mass = float((torch.exp(lse_c - lse) - 1).abs().mean())
    return output, mass


def test_attention_errors_match_a_plain_float64_computation() -> None:
    batch = clustered_batch(heads=3, n_keys=40, n_queries=64, dim=8, clusters=4, seed=91, budget=10)
    batch.key_len = torch.tensor([40, 25, 33])
    batch.key_bias = torch.randn(3, 40, generator=torch.Generator().manual_seed(92))
    batch.budget = torch.tensor([10, 4, 20])
    result = compact_heads(batch, "am-highest-attention")
    heldout = torch.randn(3, 30, 8, generator=torch.Generator().manual_seed(93))
    heldout_len = torch.tensor([30, 12, 1])
    errors = attention_errors(
        batch.keys, batch.values, batch.key_len, batch.key_bias, result, heldout, heldout_len, batch.scale
    )
    assert errors["output_rel_err"].dtype == torch.float64
    for h in range(3):
        n, q = int(batch.key_len[h]), heldout[h, : int(heldout_len[h])]
        _, keys, beta, values = result.head(h)
        expected = plain_errors(
            batch.keys[h, :n], batch.values[h, :n], batch.key_bias[h, :n], keys, beta, values, q, float(batch.scale)
        )
        assert float(errors["output_rel_err"][h]) == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
        assert float(errors["mass_rel_err"][h]) == pytest.approx(expected[1], rel=1e-9, abs=1e-12)


def test_attention_errors_known_values() -> None:
    batch = clustered_batch(heads=2, n_keys=16, n_queries=8, dim=4, clusters=2, seed=94, budget=16)
    kept = compact_heads(batch, "none")
    doubled = CompactedHeads(**{**kept.__dict__, "beta": kept.beta + math.log(2.0)})  # twice the mass, same output
    # huge logits: the float64 evaluation must stay finite
    queries = 1e3 * torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(95))
    for result, output_err, mass_err in ((kept, 0.0, 0.0), (doubled, 0.0, 1.0)):
        errors = attention_errors(batch.keys, batch.values, None, None, result, queries, None, batch.scale)
        assert torch.allclose(errors["output_rel_err"], torch.full((2,), output_err, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(errors["mass_rel_err"], torch.full((2,), mass_err, dtype=torch.float64), atol=1e-6)
    no_queries = attention_errors(
        batch.keys, batch.values, None, None, kept, queries, torch.tensor([0, 5]), batch.scale
    )
    assert math.isnan(float(no_queries["output_rel_err"][0])) and math.isnan(float(no_queries["mass_rel_err"][0]))
    assert float(no_queries["output_rel_err"][1]) < 1e-6
