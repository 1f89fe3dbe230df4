"""Ridge least squares for the AM value refit (step 3: C2).

argmin_C ||X C - Y||^2 + lam ||C||^2 per head, lam_h = ridge_h * trace(X_h^T X_h) / t_h (relative ridge).
Normal equations + Cholesky; heads that fail (or give non-finite values) retry with a 1e-2 relative ridge, then
with the dual form X^T (X X^T + lam I)^-1 Y when they have fewer valid rows than columns; heads still without a
finite solution are zeroed and reported in `failed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_compact.kernels._dispatch import cdiv, jit, use_triton

try:  # optional: kernel bodies only need `tl` when they are jitted
    import triton.language as tl
except Exception:
    tl = None

FALLBACK_RIDGE = 1e-2
_TINY = 1e-30  # keeps a zero trace from giving lam = 0 (an all-zero X then solves to C = 0)


@dataclass
class LstsqResult:
    solution: Tensor  # [H,t,D] fp32
    failed: Tensor  # [H] bool: no finite solution even after fallbacks (solution zeroed there)


@dataclass
class _System:
    X: Tensor  # [H,N,t] as given (entries at invalid rows/columns are ignored, even NaN)
    Y: Tensor  # [H,N,D] as given
    row_valid: Tensor  # [H,N] bool
    col_valid: Tensor  # [H,t] bool

    def subset(self, idx: Tensor) -> "_System":
        return _System(self.X[idx], self.Y[idx], self.row_valid[idx], self.col_valid[idx])

    def masked(self) -> tuple[Tensor, Tensor]:
        """fp32 X and Y with invalid rows/columns set to 0."""
        keep = self.row_valid[:, :, None] & self.col_valid[:, None, :]
        X = torch.where(keep, self.X.float(), 0.0)
        Y = torch.where(self.row_valid[:, :, None], self.Y.float(), 0.0)
        return X, Y


def _system(X: Tensor, Y: Tensor, col_mask: Tensor | None, row_mask: Tensor | None) -> _System:
    heads, rows, cols = X.shape
    device = X.device
    row_valid = torch.ones(heads, rows, dtype=torch.bool, device=device) if row_mask is None else row_mask.bool()
    col_valid = torch.ones(heads, cols, dtype=torch.bool, device=device) if col_mask is None else col_mask.bool()
    return _System(X=X, Y=Y, row_valid=row_valid, col_valid=col_valid)


def _ridge_per_head(ridge: float | Tensor, heads: int, device: torch.device) -> Tensor:
    if isinstance(ridge, Tensor):
        return ridge.to(device=device, dtype=torch.float32).reshape(-1).expand(heads).contiguous()
    return torch.full((heads,), float(ridge), dtype=torch.float32, device=device)


def _absolute_ridge(gram: Tensor, col_valid: Tensor, relative: Tensor) -> Tensor:
    """lam_h = relative_h * trace(G_h) / t_h over valid columns."""
    trace = torch.where(col_valid, torch.diagonal(gram, dim1=1, dim2=2), 0.0).sum(dim=1)
    lam = relative * trace / col_valid.sum(dim=1).clamp(min=1)
    return torch.where(torch.isfinite(lam) & (lam > 0), lam, torch.full_like(lam, _TINY))


def _cholesky_solve(A: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """Solve A Z = rhs for SPD A; returns Z and a per-head success flag (factorised and finite)."""
    chol, info = torch.linalg.cholesky_ex(A)
    Z = torch.cholesky_solve(rhs, chol)
    ok = (info == 0) & torch.isfinite(Z).flatten(1).all(dim=1)
    return Z, ok


def _regularised(matrix: Tensor, valid: Tensor, lam: Tensor) -> Tensor:
    """matrix + lam I on valid indices; invalid ones become identity rows/columns (decoupled, solve to 0)."""
    if bool(valid.all()):  # the common case: no masking, only the diagonal changes
        result = matrix.clone()
        result.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        return result
    pair = valid[:, :, None] & valid[:, None, :]
    diag = torch.where(valid, lam[:, None], torch.ones_like(lam)[:, None])
    regularised = torch.where(pair, matrix, 0.0)
    regularised.diagonal(dim1=-2, dim2=-1).add_(diag)
    return regularised


def _primal(gram: Tensor, xty: Tensor, col_valid: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(G + lam I) C = X^T Y."""
    return _cholesky_solve(_regularised(gram, col_valid, lam), torch.where(col_valid[:, :, None], xty, 0.0))


def _dual(system: _System, lam: Tensor) -> tuple[Tensor, Tensor]:
    """C = X^T (X X^T + lam I)^-1 Y."""
    X, Y = system.masked()
    Z, ok = _cholesky_solve(_regularised(torch.bmm(X, X.transpose(1, 2)), system.row_valid, lam), Y)
    C = torch.bmm(X.transpose(1, 2), Z)
    return C, ok & torch.isfinite(C).flatten(1).all(dim=1)


def solve_from_normal_equations(
    system: _System, gram: Tensor, xty: Tensor, ridge: float | Tensor
) -> LstsqResult:
    """The fallback chain on precomputed G = X^T X and X^T Y (shared by the torch and Triton paths)."""
    heads = gram.shape[0]
    relative = _ridge_per_head(ridge, heads, gram.device)
    C, ok = _primal(gram, xty, system.col_valid, _absolute_ridge(gram, system.col_valid, relative))
    if not bool(ok.all()):
        idx = (~ok).nonzero()[:, 0]
        lam = _absolute_ridge(gram[idx], system.col_valid[idx], torch.full_like(relative[idx], FALLBACK_RIDGE))
        C_retry, ok_retry = _primal(gram[idx], xty[idx], system.col_valid[idx], lam)
        C[idx] = C_retry
        ok[idx] = ok_retry
        few_rows = system.row_valid[idx].sum(dim=1) < system.col_valid[idx].sum(dim=1)
        use_dual = ~ok_retry & few_rows
        if bool(use_dual.any()):
            C_dual, ok_dual = _dual(system.subset(idx[use_dual]), lam[use_dual])
            C[idx[use_dual]] = C_dual
            ok[idx[use_dual]] = ok_dual
    C = torch.where(ok[:, None, None] & system.col_valid[:, :, None], C, 0.0)
    return LstsqResult(solution=C, failed=~ok)


def value_lstsq_ref(
    X: Tensor,
    Y: Tensor,
    *,
    ridge: float | Tensor = 1e-3,
    col_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
) -> LstsqResult:
    """Torch implementation (the CPU production path)."""
    system = _system(X, Y, col_mask, row_mask)
    return solve_from_normal_equations(system, *_normal_equations_torch(system), ridge)


def _normal_equations_torch(system: _System) -> tuple[Tensor, Tensor]:
    """X^T X and X^T Y over the valid rows and columns (torch)."""
    X_masked, Y_masked = system.masked()
    Xt = X_masked.transpose(1, 2)
    return torch.bmm(Xt, X_masked), torch.bmm(Xt, Y_masked)


def value_lstsq_path(
    X: Tensor,
    Y: Tensor,
    ridges: Sequence[float | Tensor],
    *,
    col_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
) -> list[LstsqResult]:
    """One solution per relative ridge, all from one pair of normal equations (what choosing a ridge on held-out
    rows needs: the gram is the expensive part, each extra ridge costs one Cholesky)."""
    system = _system(X, Y, col_mask, row_mask)
    gram, xty = _normal_equations_triton(system) if use_triton(X, Y) else _normal_equations_torch(system)
    return [solve_from_normal_equations(system, gram, xty, ridge) for ridge in ridges]


def value_lstsq(
    X: Tensor,
    Y: Tensor,
    *,
    ridge: float | Tensor = 1e-3,
    col_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
) -> LstsqResult:
    """Triton normal equations on CUDA tensors (or when forced), else the torch reference."""
    impl = value_lstsq_triton if use_triton(X, Y) else value_lstsq_ref
    return impl(X, Y, ridge=ridge, col_mask=col_mask, row_mask=row_mask)


# ---------------------------------------------------------------------------------------------------- Triton

# fp32 products through three TF32 passes: ~fp32 accuracy at tensor-core speed (plain TF32 would put ~1e-3
# relative error into the normal equations).
GRAM_PRECISION = "tf32x3"


def _transposed_product(
    a_ptr, b_ptr, row_mask_ptr, out_ptr,
    n_rows, a_cols, b_cols,
    sa_h, sa_n, sa_c, sb_h, sb_n, sb_c, sm_h, sm_n, so_h, so_i, so_j,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[h] = A[h]^T diag(row_mask[h]) B[h], one [BLOCK_I, BLOCK_J] tile per program, streaming over rows.

    SYMMETRIC (A is B): only tiles on or above the diagonal are computed, each also stored mirrored.
    """
    head = tl.program_id(0).to(tl.int64)  # offsets of later heads can pass 2^31
    tile_i = tl.program_id(1)
    tile_j = tl.program_id(2)
    if SYMMETRIC:
        active = tile_j >= tile_i
    else:
        active = tile_j >= 0
    if active:
        ci = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
        cj = tile_j * BLOCK_J + tl.arange(0, BLOCK_J)
        acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
        for start in range(0, n_rows, BLOCK_K):
            rows = start + tl.arange(0, BLOCK_K)
            row_ok = (rows < n_rows) & (tl.load(row_mask_ptr + head * sm_h + rows * sm_n, mask=rows < n_rows, other=0) != 0)
            a = tl.load(a_ptr + head * sa_h + rows[:, None] * sa_n + ci[None, :] * sa_c,
                        mask=row_ok[:, None] & (ci[None, :] < a_cols), other=0.0)
            b = tl.load(b_ptr + head * sb_h + rows[:, None] * sb_n + cj[None, :] * sb_c,
                        mask=row_ok[:, None] & (cj[None, :] < b_cols), other=0.0)
            acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
        in_bounds = (ci[:, None] < a_cols) & (cj[None, :] < b_cols)
        tl.store(out_ptr + head * so_h + ci[:, None] * so_i + cj[None, :] * so_j, acc, mask=in_bounds)
        if SYMMETRIC:
            if tile_j > tile_i:
                tl.store(out_ptr + head * so_h + ci[:, None] * so_j + cj[None, :] * so_i, acc, mask=in_bounds)


def transposed_product_triton(A: Tensor, B: Tensor | None, row_mask: Tensor | None) -> Tensor:
    """A^T diag(row_mask) B per head (B = None: the gram A^T A, computed on one triangle). fp32 in and out."""
    heads, n_rows, a_cols = A.shape
    symmetric = B is None
    B = A if symmetric else B
    b_cols = B.shape[2]
    if row_mask is None:
        row_mask = torch.ones(heads, n_rows, dtype=torch.int8, device=A.device)
    row_mask = row_mask.to(torch.int8)
    out = torch.empty(heads, a_cols, b_cols, dtype=torch.float32, device=A.device)
    if out.numel() == 0:
        return out
    block_i = 64
    block_j = 64 if b_cols > 32 else max(16, 1 << max(0, b_cols - 1).bit_length())
    grid = (heads, cdiv(a_cols, block_i), cdiv(b_cols, block_j))
    jit(_transposed_product)[grid](
        A, B, row_mask, out, n_rows, a_cols, b_cols, *A.stride(), *B.stride(), *row_mask.stride(), *out.stride(),
        SYMMETRIC=symmetric, PRECISION=GRAM_PRECISION, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=32,
    )
    return out


def value_lstsq_triton(
    X: Tensor,
    Y: Tensor,
    *,
    ridge: float | Tensor = 1e-3,
    col_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
) -> LstsqResult:
    """Triton X^T X and X^T Y streaming over N (no masked copy of X), then the torch Cholesky fallback chain."""
    system = _system(X, Y, col_mask, row_mask)
    return solve_from_normal_equations(system, *_normal_equations_triton(system), ridge)


def _normal_equations_triton(system: _System) -> tuple[Tensor, Tensor]:
    """X^T X and X^T Y streaming over the valid rows (Triton; invalid columns are ignored by the solve)."""
    X32, Y32 = system.X.float(), system.Y.float()
    return transposed_product_triton(X32, None, system.row_valid), transposed_product_triton(X32, Y32, system.row_valid)
