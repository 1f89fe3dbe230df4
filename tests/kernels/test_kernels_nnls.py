"""nnls_pg: the torch reference against plain float64 math (and scipy's bounded solver), Triton against the reference."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import lsq_linear

from vllm_compact.kernels.nnls import nnls_pg, nnls_pg_ref, nnls_pg_triton

nnls_module = importlib.import_module("vllm_compact.kernels.nnls")  # the package attribute is the function

LOWER, UPPER = math.exp(-3), math.exp(3)


def plain_recipe(M, m, lower, upper, ridge, pg_iters, power_iters):
    """The documented recipe for one head, in float64 numpy."""
    M = np.asarray(M, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    G = M.T @ M
    b = M.T @ m
    t = G.shape[0]
    lam = ridge * np.trace(G) / t
    w = np.clip(np.linalg.solve(G + lam * np.eye(t), b), lower, upper)
    v = np.ones(t) / math.sqrt(t)
    for _ in range(power_iters):
        v = G @ v
        v = v / np.linalg.norm(v)
    eta = 1.0 / (v @ G @ v)
    for _ in range(pg_iters):
        w = np.clip(w - eta * (G @ w - b), lower, upper)
    return w


def mass_problem(seed, heads, rows, cols, spread=1.0):
    """Positive design (like exp-logits) and a target whose exact weights straddle the bounds."""
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(heads, rows, cols, generator=g) + 0.05
    w_true = torch.exp(torch.randn(heads, cols, generator=g) * 2.0 * spread)
    m = (M @ w_true[:, :, None])[:, :, 0] + 0.01 * torch.randn(heads, rows, generator=g)
    return M, m


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    heads=st.integers(1, 3),
    cols=st.integers(1, 6),
    extra_rows=st.integers(4, 30),
    pg_iters=st.integers(0, 4),
    power_iters=st.integers(1, 5),
)
def test_reference_matches_plain_recipe(seed, heads, cols, extra_rows, pg_iters, power_iters):
    M, m = mass_problem(seed, heads, cols + extra_rows, cols)
    w = nnls_pg_ref(M, m, lower=LOWER, upper=UPPER, pg_iters=pg_iters, power_iters=power_iters, ridge=1e-6)
    assert w.dtype == torch.float32
    for h in range(heads):
        expected = plain_recipe(M[h], m[h], LOWER, UPPER, 1e-6, pg_iters, power_iters)
        np.testing.assert_allclose(w[h].numpy(), expected, rtol=2e-3, atol=2e-4)


def test_many_steps_reach_the_bounded_optimum():
    M, m = mass_problem(1, 3, 40, 6)
    w = nnls_pg_ref(M, m, lower=LOWER, upper=UPPER, pg_iters=4000, power_iters=20, ridge=0.0)
    for h in range(3):
        best = lsq_linear(M[h].double().numpy(), m[h].double().numpy(), bounds=(LOWER, UPPER), tol=1e-12).x
        np.testing.assert_allclose(w[h].numpy(), best, rtol=1e-3, atol=1e-3)
    assert ((w == LOWER) | (w == UPPER)).any()  # some bound is active, so the clamp mattered


def test_prior_equals_the_augmented_bounded_problem():
    """lam ||w - c||^2 is the same as appending the rows sqrt(lam) I w = sqrt(lam) c (scipy's bounded optimum)."""
    M, m = mass_problem(4, 2, 30, 5)
    lam = torch.tensor([0.5, 20.0])
    c = torch.tensor([[2.0] * 5, [0.3, 1.0, 4.0, 0.2, 9.0]])
    w = nnls_pg_ref(M, m, lower=LOWER, upper=UPPER, pg_iters=4000, power_iters=20, ridge=0.0, prior=(lam, c))
    for h in range(2):
        root = math.sqrt(float(lam[h]))
        A = np.vstack([M[h].double().numpy(), root * np.eye(5)])
        y = np.concatenate([m[h].double().numpy(), root * c[h].double().numpy()])
        best = lsq_linear(A, y, bounds=(LOWER, UPPER), tol=1e-12).x
        np.testing.assert_allclose(w[h].numpy(), best, rtol=1e-3, atol=1e-3)


def test_inside_bounds_equals_least_squares():
    M, m = mass_problem(2, 2, 30, 4, spread=0.2)
    w = nnls_pg_ref(M, m, lower=1e-12, upper=1e3, pg_iters=2, ridge=0.0)
    for h in range(2):
        exact = np.linalg.lstsq(M[h].double().numpy(), m[h].double().numpy(), rcond=None)[0]
        np.testing.assert_allclose(w[h].numpy(), exact, rtol=1e-3, atol=1e-4)


def test_masks_equal_the_reduced_problem():
    M, m = mass_problem(3, 2, 25, 7)
    col_mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    row_mask = torch.rand(2, 25, generator=torch.Generator().manual_seed(4)) > 0.3
    M_dirty = M.clone()
    M_dirty[~col_mask[:, None, :].expand_as(M)] = float("nan")  # invalid entries never influence the fit
    M_dirty[~row_mask] = float("inf")
    m_dirty = m.masked_fill(~row_mask, float("nan"))
    w = nnls_pg_ref(M_dirty, m_dirty, lower=LOWER, upper=UPPER, col_mask=col_mask, row_mask=row_mask)
    for h in range(2):
        rows, cols = row_mask[h], col_mask[h]
        expected = plain_recipe(M[h][rows][:, cols], m[h][rows], LOWER, UPPER, 1e-6, 2, 3)
        np.testing.assert_allclose(w[h][cols].numpy(), expected, rtol=2e-3, atol=2e-4)
        assert (w[h][~cols] == 0).all()


def test_nan_and_degenerate_inputs_never_escape():
    M, m = mass_problem(5, 3, 12, 4)
    M[0, 3, 1] = float("nan")  # poisons head 0
    M[1] = 0.0  # all-zero design: no information
    m[2] = float("inf")
    w = nnls_pg_ref(M, m, lower=LOWER, upper=UPPER)
    assert torch.isfinite(w).all()
    assert ((w >= LOWER) & (w <= UPPER)).all()
    assert (w[0] == 1.0).all()  # NaN -> clamp(1.0)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_COMPACT_TRITON", raising=False)
    monkeypatch.setattr(nnls_module, "nnls_pg_triton", None)  # would fail if called
    M, m = mass_problem(6, 2, 10, 3)
    torch.testing.assert_close(nnls_pg(M, m, lower=LOWER, upper=UPPER), nnls_pg_ref(M, m, lower=LOWER, upper=UPPER))


# ------------------------------------------------------------------------------------ Triton vs reference


@pytest.mark.triton_kernel
@pytest.mark.parametrize("pg_iters,power_iters", [(2, 3), (7, 1)])
def test_triton_matches_reference(triton_device, pg_iters, power_iters):
    # 70 columns: past one 64-row block of the projected-gradient kernel and the gram tiles.
    M, m = mass_problem(7, 3, 200, 70)
    col_mask = torch.rand(3, 70, generator=torch.Generator().manual_seed(8)) > 0.2
    row_mask = torch.rand(3, 200, generator=torch.Generator().manual_seed(9)) > 0.1
    kwargs = dict(lower=LOWER, upper=UPPER, pg_iters=pg_iters, power_iters=power_iters, ridge=1e-3)
    expected = nnls_pg_ref(M, m, col_mask=col_mask, row_mask=row_mask, **kwargs)
    dev = triton_device
    got = nnls_pg_triton(M.to(dev), m.to(dev), col_mask=col_mask.to(dev), row_mask=row_mask.to(dev), **kwargs)
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-3, atol=2e-4)
    assert (got.cpu()[~col_mask] == 0).all()


@pytest.mark.triton_kernel
def test_triton_prior_matches_reference(triton_device):
    M, m = mass_problem(11, 3, 80, 20)
    prior = (torch.tensor([0.1, 1.0, 10.0]), torch.full((3, 20), 3.0))
    kwargs = dict(lower=LOWER, upper=UPPER, pg_iters=3, power_iters=3, ridge=1e-6)
    expected = nnls_pg_ref(M, m, prior=prior, **kwargs)
    dev = triton_device
    got = nnls_pg_triton(M.to(dev), m.to(dev), prior=(prior[0].to(dev), prior[1].to(dev)), **kwargs)
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-3, atol=2e-4)


@pytest.mark.triton_kernel
def test_triton_single_column_and_nan(triton_device):
    M, m = mass_problem(10, 2, 5, 1)
    M[1, 2, 0] = float("nan")
    got = nnls_pg_triton(M.to(triton_device), m.to(triton_device), lower=LOWER, upper=UPPER)
    torch.testing.assert_close(got.cpu(), nnls_pg_ref(M, m, lower=LOWER, upper=UPPER), rtol=1e-4, atol=1e-6)
    assert got.cpu()[1, 0] == 1.0
