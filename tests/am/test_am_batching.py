"""One batched call over heads of any shape: invariants, independence of heads, fallbacks and the hold-out guard."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_compact.am import METHODS, CompactedHeads, HeadBatch, compact_heads
from vllm_compact.am.fitting import split_queries
from vllm_compact.am.selection import mark_keys

from .reference import attend64, clustered_batch, compact_attention, head_inputs, original_attention, rms_scores64

EVICTION_METHODS = ("snapkv", "h2o", "recent", "none")


@st.composite
def head_batches(draw: st.DrawFn) -> HeadBatch:
    """Random padded batches: GQA-pooled queries, tiny spans, t = 1, duplicate keys, huge logits, variable lengths."""
    heads = draw(st.integers(1, 4))
    n_keys = draw(st.integers(1, 20))
    group = draw(st.integers(1, 3))  # query heads sharing a KV head: their queries are pooled
    n_queries = group * draw(st.integers(1, 10))
    dim = draw(st.sampled_from([2, 4, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    key_len = torch.tensor([draw(st.integers(1, n_keys)) for _ in range(heads)])
    query_len = torch.tensor([draw(st.integers(0, n_queries)) for _ in range(heads)])
    budget = torch.tensor([draw(st.integers(1, int(n))) for n in key_len])
    keys = torch.randn(heads, n_keys, dim, generator=gen)
    if draw(st.booleans()) and n_keys > 1:  # duplicate keys
        keys[:, 1::2] = keys[:, 0:-1:2]
    logit_scale = draw(st.sampled_from([dim**-0.5, 1.0, 300.0]))  # 300: logits around 1e3
    return HeadBatch(
        keys=keys,
        values=torch.randn(heads, n_keys, dim, generator=gen),
        queries=torch.randn(heads, n_queries, dim, generator=gen),
        scale=logit_scale,
        budget=budget,
        key_len=key_len,
        query_len=query_len,
        key_bias=torch.randn(heads, n_keys, generator=gen) if draw(st.booleans()) else None,
    )


def assert_well_formed(result: CompactedHeads, batch: HeadBatch, method: str) -> None:
    key_len = batch.key_lengths()
    expected = key_len if method == "none" else batch.budget
    assert torch.equal(result.length, expected)
    for h in range(batch.num_heads):
        n = int(result.length[h])
        indices, keys, beta, values = result.head(h)
        assert bool((indices >= 0).all()) and bool((indices < key_len[h]).all())
        assert indices.unique().numel() == n
        assert bool((result.indices[h, n:] == -1).all())
        assert bool(torch.isneginf(result.beta[h, n:]).all())
        assert torch.equal(keys, batch.keys[h, indices])
        assert bool(torch.isfinite(beta).all()) and bool(torch.isfinite(values).all())
        bias = torch.zeros(n) if batch.key_bias is None else batch.key_bias[h, indices]
        if method in EVICTION_METHODS or bool(result.fell_back[h]):
            assert torch.equal(values, batch.values[h, indices])
            assert torch.equal(beta, bias)
    assert result.keys.dtype == batch.keys.dtype and result.values.dtype == batch.values.dtype


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=head_batches(), method=st.sampled_from(METHODS))
def test_random_batches_are_well_formed(batch: HeadBatch, method: str) -> None:
    result = compact_heads(batch, method)
    assert_well_formed(result, batch, method)
    if method.startswith("am-"):
        no_queries = batch.query_len == 0
        assert bool(result.fell_back[no_queries].all())  # nothing to fit on: eviction


def ridge_objective(X: torch.Tensor, C: torch.Tensor, Y: torch.Tensor, lam: float, prior: torch.Tensor) -> float:
    return float((X @ C - Y).square().sum() + lam * (C - prior).square().sum())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=head_batches(), shrink=st.booleans())
def test_highest_attention_selects_top_scores_and_solves_the_value_fit(batch: HeadBatch, shrink: bool) -> None:
    ridge = 1e-3
    result = compact_heads(batch, "am-highest-attention", holdout_fraction=0.0, value_ridge=ridge,
                           shrink_to_original=shrink, follow_tokens=0)
    assert_well_formed(result, batch, "am-highest-attention")
    for h in range(batch.num_heads):
        inp = head_inputs(batch, h)
        if inp["queries"].shape[0] == 0 or bool(result.fell_back[h]):
            continue
        indices, keys, beta, values = result.head(h)
        # keys: the budget best by float64 RMS attention (up to fp32 rounding)
        scores = rms_scores64(inp["queries"], inp["keys"], inp["scale"], inp["bias"], "rms")
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen[indices] = True
        if not bool(chosen.all()):
            assert float(scores[chosen].min()) >= float(scores[~chosen].max()) - 1e-5
        # w = exp(beta - existing bias) stays within [e^-3, e^3]
        bias = torch.zeros(len(indices)) if inp["bias"] is None else inp["bias"][indices]
        log_w = beta - bias
        assert bool((log_w >= -3.0 - 1e-4).all()) and bool((log_w <= 3.0 + 1e-4).all())
        # C2 minimises ||X C - Y||^2 + lam ||C - P||^2 for X = softmax(s Q C1^T + beta), Y = original output,
        # P = the kept keys' original values (shrink) or 0, lam relative to trace(X^T X)
        logits = inp["scale"] * inp["queries"].double() @ keys.double().T + beta.double()[None, :]
        X = torch.softmax(logits, dim=1)
        Y, _ = original_attention(batch, h)
        prior = batch.values[h, indices].double() if shrink else torch.zeros_like(values, dtype=torch.float64)
        lam = ridge * float(X.square().sum()) / X.shape[1]
        eye = torch.eye(X.shape[1], dtype=torch.float64)
        optimum = torch.linalg.solve(X.T @ X + lam * eye, X.T @ Y + lam * prior)
        best = ridge_objective(X, optimum, Y, lam, prior)
        got = ridge_objective(X, values.double(), Y, lam, prior)
        assert got <= best * (1 + 1e-3) + 1e-6 * float(Y.square().sum())


def test_value_ridge_is_chosen_on_the_held_out_rows() -> None:
    """With held-out rows, each head's C2 does at least as well there as every single-ridge fit of the same keys."""
    batch = clustered_values_batch(heads=6, n_keys=64, n_queries=96, dim=16, seed=11, budget=10)
    grid = (1e-4, 1e-2, 1.0, 30.0)
    rows = split_queries(torch.ones(6, 96, dtype=torch.bool), 0.25, 2)
    chosen = compact_heads(batch, "am-highest-attention", seed=2, value_ridge=grid[0], ridge_grid=grid[1:])
    singles = [compact_heads(batch, "am-highest-attention", seed=2, value_ridge=r, ridge_grid=()) for r in grid]
    scale = float(batch.scale)
    for h in range(6):
        held = batch.queries[h, rows.heldout[h]]
        target, _ = original_attention(batch, h, held)
        errors = []
        for result in (chosen, *singles):
            indices, keys, beta, values = result.head(h)
            assert torch.equal(indices, chosen.head(h)[0])  # the same keys: only the value fit differs
            errors.append(held_out_error(held, keys, beta, values, target, scale))
        assert errors[0] <= min(errors[1:]) * (1 + 1e-4) + 1e-9, (h, errors)


def test_without_value_refit_the_kept_keys_keep_their_values_and_beta_is_still_fitted() -> None:
    batch = clustered_values_batch(heads=6, n_keys=64, n_queries=96, dim=16, seed=5, budget=10)
    options = {"seed": 2, "holdout_fraction": 0.0}
    refit = compact_heads(batch, "am-highest-attention", **options)
    kept = compact_heads(batch, "am-highest-attention", refit_values=False, **options)
    for h in range(6):
        indices, keys, beta, values = kept.head(h)
        assert torch.equal(indices, refit.head(h)[0])
        assert torch.equal(values, batch.values[h, indices])
        assert torch.allclose(beta, refit.head(h)[2])  # the mass fit comes before, and without, the value fit
    assert any(not torch.allclose(kept.head(h)[3], refit.head(h)[3]) for h in range(6))  # refit does move C2
    assert bool((kept.beta[kept.indices >= 0] != 0).any())


def mass_atoms64(batch: HeadBatch, h: int) -> torch.Tensor:
    """float64 exp(s q.k - row max) of head h (no bias, no mask): the mass fit's design matrix."""
    logits = float(batch.scale) * batch.queries[h].double() @ batch.keys[h].double().T
    return torch.exp(logits - logits.amax(dim=1, keepdim=True))


def test_mass_prior_pulls_weights_to_the_uniform_rescaling() -> None:
    """A huge mass_prior_ridge gives every kept key w = c = (span mass) / (kept mass) over the reference queries."""
    batch = clustered_batch(heads=3, n_keys=48, n_queries=64, dim=16, clusters=5, seed=7, budget=8)
    result = compact_heads(batch, "am-highest-attention", holdout_fraction=0.0, mass_prior_ridge=1e6)
    for h in range(3):
        indices, _, beta, _ = result.head(h)
        phi = mass_atoms64(batch, h)
        c = float(phi.sum() / phi[:, indices].sum())
        expected = min(max(c, math.exp(-3)), math.exp(3))
        assert torch.allclose(beta.double().exp(), torch.full_like(beta, expected, dtype=torch.float64), rtol=1e-3)


def test_mass_fit_is_at_least_as_good_as_the_clamped_least_squares() -> None:
    batch = clustered_batch(heads=3, n_keys=48, n_queries=192, dim=16, clusters=5, seed=31, budget=12)
    result = compact_heads(batch, "am-highest-attention", holdout_fraction=0.0, mass_prior_ridge=0.0)
    for h in range(3):
        indices, keys, beta, _ = result.head(h)
        phi = mass_atoms64(batch, h)
        M, m = phi[:, indices], phi.sum(dim=1)
        clamped = torch.linalg.lstsq(M, m[:, None]).solution[:, 0].clamp(math.exp(-3), math.exp(3))
        fitted = torch.exp(beta.double())
        assert float((M @ fitted - m).norm()) <= 1.001 * float((M @ clamped - m).norm()) + 1e-9
        assert float((M @ fitted - m).norm()) < float((M.sum(dim=1) - m).norm())  # beats beta = 0


@pytest.mark.parametrize("method", ["am-highest-attention", "am-omp"])
def test_batch_equals_heads_solved_alone(method: str) -> None:
    """Different budgets, key lengths and query lengths in one padded batch (split into chunks or not)."""
    gen = torch.Generator().manual_seed(41)
    key_len = torch.tensor([40, 17, 33, 25])
    query_len = torch.tensor([70, 90, 45, 64])
    budget = torch.tensor([9, 3, 16, 1])
    batch = HeadBatch(
        keys=torch.randn(4, 40, 8, generator=gen),
        values=torch.randn(4, 40, 8, generator=gen),
        queries=1.5 * torch.randn(4, 90, 8, generator=gen),
        scale=torch.tensor([0.35, 0.5, 0.3, 0.4]),
        budget=budget,
        key_len=key_len,
        query_len=query_len,
    )
    options = {"holdout_fraction": 0.0}
    together = compact_heads(batch, method, **options)
    chunked = compact_heads(batch, method, chunk_elements=1, **options)  # one head per chunk
    for h in range(4):
        inp = head_inputs(batch, h)
        alone = compact_heads(
            HeadBatch(
                keys=inp["keys"][None], values=inp["values"][None], queries=inp["queries"][None],
                scale=inp["scale"], budget=budget[h : h + 1],
            ),
            method,
            **options,
        )
        for result in (together, chunked):
            indices, keys, beta, values = result.head(h)
            assert torch.equal(indices, alone.indices[0])
            assert torch.allclose(beta, alone.beta[0], atol=1e-4)
            assert torch.allclose(values, alone.values[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["am-highest-attention", "am-omp"])
def test_nan_head_falls_back_without_touching_the_others(method: str) -> None:
    batch = clustered_batch(heads=3, n_keys=32, n_queries=96, dim=8, clusters=4, seed=51, budget=8)
    batch.key_bias = torch.randn(3, 32, generator=torch.Generator().manual_seed(52))
    clean = compact_heads(batch, method)
    poisoned = HeadBatch(**{**batch.__dict__, "keys": batch.keys.clone()})
    poisoned.keys[1, 5, 2] = float("nan")
    result = compact_heads(poisoned, method)
    assert bool(result.fell_back[1])
    indices, _, beta, values = result.head(1)
    assert indices.unique().numel() == 8 and bool((indices >= 0).all()) and bool((indices < 32).all())
    assert torch.equal(beta, batch.key_bias[1, indices])  # eviction keeps the existing bias
    assert torch.equal(values, batch.values[1, indices])
    for h in (0, 2):
        assert torch.equal(result.indices[h], clean.indices[h])
        assert torch.allclose(result.beta[h], clean.beta[h], atol=1e-5)
        assert torch.allclose(result.values[h], clean.values[h], atol=1e-5)
        assert bool(result.fell_back[h]) == bool(clean.fell_back[h])


def fresh_output_error(result: CompactedHeads, batch: HeadBatch, h: int, queries: torch.Tensor) -> float:
    out, _ = compact_attention(result, batch, h, queries)
    out_ref, _ = original_attention(batch, h, queries)
    return float((out - out_ref).norm() / out_ref.norm())


def held_out_error(queries: torch.Tensor, keys: torch.Tensor, beta: torch.Tensor, values: torch.Tensor,
                   target: torch.Tensor, scale: float) -> float:
    out, _ = attend64(queries, keys, values, scale, beta)
    return float((out - target).square().sum())


def clustered_values_batch(heads: int, n_keys: int, n_queries: int, dim: int, seed: int, budget: int) -> HeadBatch:
    """Keys and values both clustered: a kept key's value stands for its cluster, so eviction is competitive."""
    gen = torch.Generator().manual_seed(seed)
    clusters = 5
    key_centres = 1.5 * torch.randn(heads, clusters, dim, generator=gen)
    value_centres = torch.randn(heads, clusters, dim, generator=gen)
    assign = torch.randint(0, clusters, (heads, n_keys), generator=gen)[:, :, None].expand(-1, -1, dim)
    keys = torch.gather(key_centres, 1, assign) + 0.3 * torch.randn(heads, n_keys, dim, generator=gen)
    values = torch.gather(value_centres, 1, assign) + 0.1 * torch.randn(heads, n_keys, dim, generator=gen)
    return HeadBatch(keys=keys, values=values, queries=torch.randn(heads, n_queries, dim, generator=gen),
                     scale=dim**-0.5, budget=torch.full((heads,), budget))


def test_holdout_guard_keeps_whichever_is_better_on_the_held_out_queries() -> None:
    """OMP selects and fits on the fit rows only, so each head's AM candidate can be rebuilt from them alone.

    A strong value ridge (0.45) makes the AM candidate lose to eviction on some heads and win on others.
    """
    batch = clustered_values_batch(heads=8, n_keys=48, n_queries=48, dim=16, seed=5, budget=12)
    scale = float(batch.scale)
    options = {"value_ridge": 0.45, "ridge_grid": (), "shrink_to_original": False}
    result = compact_heads(batch, "am-omp", holdout_fraction=0.25, seed=3, **options)
    rows = split_queries(torch.ones(8, 48, dtype=torch.bool), 0.25, 3)
    decisions = []
    for h in range(8):
        assert int(rows.heldout[h].sum()) == 12 and int(rows.fit[h].sum()) == 36
        fit_queries, held_queries = batch.queries[h, rows.fit[h]], batch.queries[h, rows.heldout[h]]
        candidate = compact_heads(
            HeadBatch(keys=batch.keys[h : h + 1], values=batch.values[h : h + 1], queries=fit_queries[None],
                      scale=scale, budget=batch.budget[h : h + 1]),
            "am-omp", holdout_fraction=0.0, **options,
        )
        indices, keys, beta, values = candidate.head(0)
        target, _ = original_attention(batch, h, held_queries)
        am_error = held_out_error(held_queries, keys, beta, values, target, scale)
        eviction_error = held_out_error(held_queries, keys, torch.zeros_like(beta), batch.values[h, indices], target,
                                        scale)
        got_indices, _, got_beta, got_values = result.head(h)
        assert torch.equal(got_indices, indices)
        if abs(am_error - eviction_error) < 1e-3 * max(am_error, eviction_error):
            continue  # too close to call in fp32
        evict = eviction_error < am_error
        decisions.append(evict)
        assert bool(result.fell_back[h]) == evict, (h, am_error, eviction_error)
        if evict:
            assert torch.equal(got_values, batch.values[h, indices]) and torch.equal(got_beta, torch.zeros_like(beta))
        else:
            assert torch.allclose(got_values, values, rtol=1e-4, atol=1e-4)
            assert torch.allclose(got_beta, beta, atol=1e-4)
    assert True in decisions and False in decisions  # both outcomes exercised


def test_holdout_guard_keeps_am_with_plenty_of_queries() -> None:
    batch = clustered_batch(heads=3, n_keys=64, n_queries=256, dim=16, clusters=6, seed=62, budget=16)
    guarded = compact_heads(batch, "am-highest-attention")
    assert not bool(guarded.fell_back.any())
    fresh = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(63))
    for h in range(3):
        indices, keys, _, _ = guarded.head(h)
        evicted, _ = attend64(fresh[h], keys, batch.values[h, indices], float(batch.scale))
        out_ref, _ = original_attention(batch, h, fresh[h])
        eviction_error = float((evicted - out_ref).norm() / out_ref.norm())
        assert fresh_output_error(guarded, batch, h, fresh[h]) < eviction_error


def test_holdout_split_is_seeded() -> None:
    batch = clustered_batch(heads=2, n_keys=32, n_queries=40, dim=8, clusters=3, seed=71, budget=6)
    first = compact_heads(batch, "am-highest-attention", seed=5)
    second = compact_heads(batch, "am-highest-attention", seed=5)
    other = compact_heads(batch, "am-highest-attention", seed=6)
    assert torch.equal(first.values, second.values) and torch.equal(first.beta, second.beta)
    assert not torch.equal(first.values, other.values)


def test_unknown_method_and_option_are_rejected() -> None:
    batch = clustered_batch(heads=1, n_keys=8, n_queries=8, dim=4, clusters=2, seed=81, budget=2)
    with pytest.raises(ValueError, match="unknown compaction method"):
        compact_heads(batch, "am-magic")
    with pytest.raises(ValueError, match="no option"):
        compact_heads(batch, "am-omp", pool_kernel=3)
    batch.budget = torch.tensor([9])
    with pytest.raises(ValueError, match="budget"):
        compact_heads(batch, "snapkv")


def test_omp_drop_and_refill_keeps_budgets() -> None:
    """A high drop threshold forces drop/exclude/refill rounds; budgets, distinct keys and weights survive."""
    batch = clustered_batch(heads=3, n_keys=40, n_queries=80, dim=8, clusters=4, seed=101, budget=10)
    batch.budget = torch.tensor([10, 35, 40])  # 40 = every key: nothing can be refilled, so nothing is dropped
    plain = compact_heads(batch, "am-omp", holdout_fraction=0.0, drop_rounds=0, seed_fraction=0.0)
    dropped = compact_heads(batch, "am-omp", holdout_fraction=0.0, drop_log_weight=0.0, drop_rounds=3,
                            seed_fraction=0.0)
    assert_well_formed(dropped, batch, "am-omp")
    assert not torch.equal(plain.indices[0], dropped.indices[0])
    assert dropped.head(2)[0].tolist() == list(range(40))
    assert bool((dropped.beta[torch.isfinite(dropped.beta)] >= math.log(1e-12) - 1e-3).all())
    assert bool((dropped.beta[torch.isfinite(dropped.beta)] <= 7.0 + 1e-3).all())


def test_omp_candidate_pool_of_one_budget_keeps_the_highest_attention_keys() -> None:
    """candidate_pool = 1: OMP may only choose among the budget keys of highest RMS attention, so it takes them all."""
    batch = clustered_batch(heads=3, n_keys=64, n_queries=48, dim=16, clusters=5, seed=13, budget=9)
    omp = compact_heads(batch, "am-omp", holdout_fraction=0.0, candidate_pool=1.0)
    for h in range(3):
        scores = rms_scores64(batch.queries[h], batch.keys[h], float(batch.scale), None, "rms")
        indices = omp.head(h)[0]
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen[indices] = True
        assert int(chosen.sum()) == 9
        assert float(scores[chosen].min()) >= float(scores[~chosen].max()) - 1e-6
    with pytest.raises(ValueError, match="candidate_pool"):
        compact_heads(batch, "am-omp", candidate_pool=0.5)


def test_omp_seed_fraction_starts_from_the_highest_attention_keys() -> None:
    """seed_fraction = f: the floor(f * budget) keys of highest RMS attention are chosen first; OMP adds the rest."""
    batch = clustered_batch(heads=3, n_keys=64, n_queries=48, dim=16, clusters=5, seed=17, budget=12)
    omp = compact_heads(batch, "am-omp", holdout_fraction=0.0, seed_fraction=0.75, drop_rounds=0)
    unseeded = compact_heads(batch, "am-omp", holdout_fraction=0.0, seed_fraction=0.0, drop_rounds=0)
    differs = False
    for h in range(3):
        scores = rms_scores64(batch.queries[h], batch.keys[h], float(batch.scale), None, "rms")
        top = set(scores.topk(9).indices.tolist())  # floor(0.75 * 12)
        chosen = set(omp.head(h)[0].tolist())
        assert len(chosen) == 12 and top <= chosen
        differs |= chosen != set(unseeded.head(h)[0].tolist())
    assert differs  # the seed changes what plain OMP would have picked
    with pytest.raises(ValueError, match="seed_fraction"):
        compact_heads(batch, "am-omp", seed_fraction=1.0)


def test_omp_seed_with_padding_never_repeats_a_key() -> None:
    """Found by CI: heads whose seed is shorter than the longest one are -1 padded; the padding must not unmark the
    head's real seed key 0, or OMP picks key 0 a second time."""
    gen = torch.Generator().manual_seed(3)
    batch = HeadBatch(
        keys=torch.randn(3, 3, 2, generator=gen),
        values=torch.randn(3, 3, 2, generator=gen),
        queries=torch.tensor([[[-2.2188, 0.2590]], [[-1.0297, -0.5008]], [[0.2734, -0.9181]]]),
        scale=2**-0.5,
        budget=torch.tensor([2, 3, 1]),
        key_len=torch.tensor([2, 3, 1]),
        query_len=torch.tensor([1, 0, 0]),
    )
    batch.keys[0, :2] = torch.tensor([[-1.1258, -1.1524], [0.5667, 0.7935]])  # key 0 is the seed of head 0
    result = compact_heads(batch, "am-omp")
    assert_well_formed(result, batch, "am-omp")
    assert result.head(0)[0].tolist() == [0, 1]


def test_mark_keys_ignores_unmarked_duplicates() -> None:
    keys = torch.tensor([[0, -1, 0, 2], [3, 3, 1, 1]])
    mark = torch.tensor([[True, False, False, True], [False, True, True, False]])
    expected = torch.zeros(2, 4, dtype=torch.bool)
    for h in range(2):
        for j in range(4):
            if mark[h, j]:
                expected[h, keys[h, j]] = True
    for _ in range(5):  # scatter order is unspecified: repeat
        assert torch.equal(mark_keys(keys, mark, 4), expected)


def test_carry_forward_matches_a_loop() -> None:
    from vllm_compact.am.selection import FOLLOW_DECAY, carry_forward

    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(4, 40, generator=gen)
    valid = torch.rand(4, 40, generator=gen) > 0.2
    assert carry_forward(scores, valid, 0) is scores  # off
    for window in (1, 5, 16):
        out = carry_forward(scores, valid, window)
        for h in range(4):
            for j in range(40):
                expected = 0.0
                if valid[h, j]:
                    expected = max(float(scores[h, i]) * (1 - FOLLOW_DECAY * (j - i))
                                   for i in range(max(0, j - window), j + 1) if valid[h, i])
                assert abs(float(out[h, j]) - expected) < 1e-6, (window, h, j)


def test_follow_tokens_keeps_the_tokens_after_a_chosen_key() -> None:
    """A single query that looks only at key 10: with follow_tokens=4 the budget of 5 is keys 10..14."""
    dim, n_keys = 8, 40
    keys = torch.zeros(1, n_keys, dim)
    keys[0, 10, 0] = 10.0
    batch = HeadBatch(keys=keys, values=torch.randn(1, n_keys, dim), queries=torch.ones(1, 1, dim), scale=1.0,
                      budget=torch.tensor([5]))
    for method in ("am-highest-attention", "snapkv"):
        result = compact_heads(batch, method, follow_tokens=4, **({"pool_kernel": 1} if method == "snapkv" else {}))
        assert sorted(result.indices[0].tolist()) == [10, 11, 12, 13, 14], method
