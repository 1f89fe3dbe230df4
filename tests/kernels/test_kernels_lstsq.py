"""value_lstsq: the torch reference against the float64 closed form, Triton against the reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_compact.kernels._dispatch import TRITON_ENV
from vllm_compact.kernels.lstsq import (
    FALLBACK_RIDGE,
    transposed_product_triton,
    value_lstsq,
    value_lstsq_path,
    value_lstsq_ref,
    value_lstsq_triton,
)

lstsq_module = importlib.import_module("vllm_compact.kernels.lstsq")  # the package attribute is the function


def closed_form(X, Y, relative_ridge):
    """float64 ridge solution of one head: (X^T X + lam I)^-1 X^T Y, lam = ridge * trace(X^T X) / t."""
    X = X.double()
    Y = Y.double()
    G = X.T @ X
    lam = relative_ridge * torch.trace(G) / G.shape[0]
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), X.T @ Y)


def random_system(seed, heads, rows, cols, dim):
    g = torch.Generator().manual_seed(seed)
    X = torch.softmax(torch.randn(heads, rows, cols, generator=g) * 2.0, dim=-1)  # attention-like rows
    Y = torch.randn(heads, rows, dim, generator=g)
    col_mask = torch.rand(heads, cols, generator=g) > 0.25
    col_mask[:, 0] = True
    row_mask = torch.rand(heads, rows, generator=g) > 0.2
    row_mask[:, 0] = True
    return X, Y, col_mask, row_mask


def check_heads(result, X, Y, col_mask, row_mask, ridge, rtol=1e-3):
    assert result.solution.dtype == torch.float32
    assert not result.failed.any()
    for h in range(X.shape[0]):
        rows, cols = row_mask[h], col_mask[h]
        lam = float(ridge[h]) if isinstance(ridge, torch.Tensor) else ridge
        expected = closed_form(X[h][rows][:, cols], Y[h][rows], lam)
        scale = expected.abs().max().item() + 1e-6
        torch.testing.assert_close(result.solution[h][cols].double(), expected, rtol=rtol, atol=rtol * scale)
        assert (result.solution[h][~cols] == 0).all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    heads=st.integers(1, 3),
    rows=st.integers(1, 25),
    cols=st.integers(1, 8),
    dim=st.integers(1, 5),
    per_head_ridge=st.booleans(),
)
def test_reference_matches_closed_form(seed, heads, rows, cols, dim, per_head_ridge):
    X, Y, col_mask, row_mask = random_system(seed, heads, rows, cols, dim)
    ridge = torch.tensor([1e-3, 1e-1, 1e-2])[:heads] if per_head_ridge else 1e-2
    result = value_lstsq_ref(X, Y, ridge=ridge, col_mask=col_mask, row_mask=row_mask)
    check_heads(result, X, Y, col_mask, row_mask, ridge)


def test_exact_fit_without_masks():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 30, 5, generator=g)
    C = torch.randn(2, 5, 4, generator=g)
    result = value_lstsq_ref(X, X @ C, ridge=0.0)
    torch.testing.assert_close(result.solution, C, rtol=1e-4, atol=1e-4)
    assert not result.failed.any()


def test_invalid_entries_are_ignored_even_when_nan():
    X, Y, col_mask, row_mask = random_system(2, 2, 20, 6, 3)
    X_dirty, Y_dirty = X.clone(), Y.clone()
    X_dirty[~row_mask] = float("nan")
    X_dirty[~col_mask[:, None, :].expand_as(X)] = float("inf")
    Y_dirty[~row_mask] = float("nan")
    result = value_lstsq_ref(X_dirty, Y_dirty, ridge=1e-3, col_mask=col_mask, row_mask=row_mask)
    check_heads(result, X, Y, col_mask, row_mask, 1e-3)


def test_nan_head_fails_alone_and_zero_design_solves_to_zero():
    X, Y, _, _ = random_system(3, 3, 12, 4, 2)
    X[0, 5, 2] = float("nan")
    X[2] = 0.0
    result = value_lstsq_ref(X, Y, ridge=1e-3)
    assert result.failed.tolist() == [True, False, False]
    assert (result.solution[0] == 0).all() and (result.solution[2] == 0).all()
    torch.testing.assert_close(result.solution[1].double(), closed_form(X[1], Y[1], 1e-3), rtol=1e-3, atol=1e-4)


def test_fallback_chain_retries_then_uses_dual_form(monkeypatch):
    """Heads whose primal solves fail get the dual form with the 1e-2 ridge when they have fewer rows than columns."""
    X, Y, _, _ = random_system(4, 2, 5, 9, 3)  # 5 rows < 9 columns
    always_fail = lambda gram, xty, col_valid, lam: (torch.zeros_like(xty), torch.zeros(gram.shape[0], dtype=torch.bool))
    monkeypatch.setattr(lstsq_module, "_primal", always_fail)
    result = value_lstsq_ref(X, Y, ridge=1e-3)
    assert not result.failed.any()
    for h in range(2):
        expected = closed_form(X[h], Y[h], FALLBACK_RIDGE)
        torch.testing.assert_close(result.solution[h].double(), expected, rtol=1e-3, atol=1e-4)


def test_fallback_without_dual_reports_failure(monkeypatch):
    X, Y, _, _ = random_system(5, 1, 12, 4, 3)  # more rows than columns: no dual form
    always_fail = lambda gram, xty, col_valid, lam: (torch.zeros_like(xty), torch.zeros(gram.shape[0], dtype=torch.bool))
    monkeypatch.setattr(lstsq_module, "_primal", always_fail)
    result = value_lstsq_ref(X, Y, ridge=1e-3)
    assert result.failed.tolist() == [True] and (result.solution == 0).all()


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_COMPACT_TRITON", raising=False)
    monkeypatch.setattr(lstsq_module, "value_lstsq_triton", None)  # would fail if called
    X, Y, col_mask, row_mask = random_system(6, 2, 10, 3, 2)
    check_heads(value_lstsq(X, Y, col_mask=col_mask, row_mask=row_mask), X, Y, col_mask, row_mask, 1e-3)


# ------------------------------------------------------------------------------------ Triton vs reference


@pytest.mark.triton_kernel
@pytest.mark.parametrize("other_cols", [None, 1, 70])
def test_triton_transposed_product_matches_float64(triton_device, other_cols):
    g = torch.Generator().manual_seed(7)
    A = torch.randn(2, 45, 70, generator=g)  # 70 columns: two tiles per side, ragged
    B = None if other_cols is None else torch.randn(2, 45, other_cols, generator=g)
    row_mask = torch.rand(2, 45, generator=g) > 0.3
    A_dirty = A.masked_fill(~row_mask[:, :, None], float("nan"))  # masked rows are never read
    got = transposed_product_triton(A_dirty.to(triton_device), None if B is None else B.to(triton_device),
                                    row_mask.to(triton_device)).cpu()
    A_masked = A.double() * row_mask[:, :, None]
    expected = A_masked.transpose(1, 2) @ (A_masked if B is None else B.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_ridge_path_matches_closed_form_for_every_ridge():
    X, Y, col_mask, row_mask = random_system(5, 3, 40, 9, 4)
    ridges = (1e-4, torch.tensor([1e-3, 1e-1, 1.0]), 10.0)
    results = value_lstsq_path(X, Y, ridges, col_mask=col_mask, row_mask=row_mask)
    assert len(results) == len(ridges)
    for ridge, result in zip(ridges, results):
        check_heads(result, X, Y, col_mask, row_mask, ridge)


@pytest.mark.triton_kernel
def test_triton_ridge_path_matches_reference(triton_device, monkeypatch):
    X, Y, col_mask, row_mask = random_system(9, 2, 50, 30, 8)
    ridges = (1e-3, 1e-1)
    monkeypatch.setenv(TRITON_ENV, "0")
    expected = value_lstsq_path(X, Y, ridges, col_mask=col_mask, row_mask=row_mask)
    monkeypatch.setenv(TRITON_ENV, "1")  # the Triton normal equations also for CPU tensors (interpreter)
    dev = triton_device
    got = value_lstsq_path(X.to(dev), Y.to(dev), ridges, col_mask=col_mask.to(dev), row_mask=row_mask.to(dev))
    for g, e in zip(got, expected):
        scale = e.solution.abs().max()
        torch.testing.assert_close(g.solution.cpu(), e.solution, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.triton_kernel
def test_triton_matches_reference(triton_device):
    X, Y, col_mask, row_mask = random_system(8, 3, 90, 70, 20)
    X[~row_mask] = float("nan")
    ridge = torch.tensor([1e-3, 1e-2, 1e-1])
    expected = value_lstsq_ref(X, Y, ridge=ridge, col_mask=col_mask, row_mask=row_mask)
    dev = triton_device
    got = value_lstsq_triton(X.to(dev), Y.to(dev), ridge=ridge.to(dev), col_mask=col_mask.to(dev),
                             row_mask=row_mask.to(dev))
    assert torch.equal(got.failed.cpu(), expected.failed)
    scale = expected.solution.abs().max()
    torch.testing.assert_close(got.solution.cpu(), expected.solution, rtol=1e-3, atol=1e-3 * scale)
