"""Bounded non-negative least squares for the AM mass fit (step 2: beta = log w).

min ||M w - m||^2 s.t. lower <= w <= upper, batched over heads. Recipe: unconstrained least squares (normal
equations, relative ridge, Cholesky; pinv where Cholesky fails) -> clamp to the bounds -> `pg_iters` projected-
gradient steps w <- clamp(w - eta (G w - b)) with G = M^T M, b = M^T m and eta = 1 / sigma_max(M)^2 estimated by
`power_iters` power iterations on G.

An optional prior (lam [H], c [H,t]) adds lam ||w - c||^2 to the objective: G + lam I and b + lam c.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_compact.kernels._dispatch import jit, next_power_of_2, use_triton

try:  # optional: kernel bodies only need `tl` when they are jitted
    import triton.language as tl
except Exception:
    tl = None


def _masked_system(M: Tensor, m: Tensor, col_mask: Tensor | None, row_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """M, m in fp32 with invalid rows and columns zeroed (so they never influence the fit, even when NaN)."""
    M = M.float()
    m = m.float()
    if row_mask is not None:
        M = torch.where(row_mask.bool()[:, :, None], M, 0.0)
        m = torch.where(row_mask.bool(), m, 0.0)
    if col_mask is not None:
        M = torch.where(col_mask.bool()[:, None, :], M, 0.0)
    return M, m


def _col_valid(col_mask: Tensor | None, heads: int, cols: int, device: torch.device) -> Tensor:
    if col_mask is None:
        return torch.ones(heads, cols, dtype=torch.bool, device=device)
    return col_mask.to(device=device, dtype=torch.bool)


def gram_and_rhs(M: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """G = M^T M [H,t,t], b = M^T m [H,t] (torch)."""
    return torch.bmm(M.transpose(1, 2), M), torch.bmm(M.transpose(1, 2), m[:, :, None])[:, :, 0]


Prior = tuple[Tensor, Tensor]  # (lam [H], c [H,t]): adds lam ||w - c||^2 to the objective


def add_prior(G: Tensor, b: Tensor, col_valid: Tensor, prior: Prior | None) -> tuple[Tensor, Tensor]:
    """G + lam I and b + lam c on valid columns (the normal equations of the prior-regularised objective)."""
    if prior is None:
        return G, b
    lam, target = prior
    lam = torch.where(torch.isfinite(lam) & (lam > 0), lam.float(), 0.0)
    diagonal = torch.where(col_valid, lam[:, None], 0.0)
    G = G.clone()
    G.diagonal(dim1=1, dim2=2).add_(diagonal)
    return G, b + diagonal * torch.where(col_valid, target.float(), 0.0)


def solve_regularised(G: Tensor, b: Tensor, col_valid: Tensor, ridge: float) -> Tensor:
    """Unconstrained w = (G + lam I)^-1 b, lam = ridge * trace(G)/t_valid; invalid columns decoupled (w = 0).

    Heads whose Cholesky fails fall back to the pseudo-inverse; heads with non-finite G or b give NaN (the caller
    replaces it).
    """
    pair = col_valid[:, :, None] & col_valid[:, None, :]
    n_valid = col_valid.sum(dim=1).clamp(min=1)
    lam = ridge * torch.where(col_valid, torch.diagonal(G, dim1=1, dim2=2), 0.0).sum(dim=1) / n_valid
    lam = torch.where(torch.isfinite(lam) & (lam > 0), lam, torch.full_like(lam, 1e-30))
    diag = torch.where(col_valid, lam[:, None], torch.ones_like(lam)[:, None])
    A = torch.where(pair, G, 0.0)
    A.diagonal(dim1=1, dim2=2).add_(diag)  # in place: a [H, t, t] diagonal matrix costs as much as A itself
    rhs = torch.where(col_valid, b, 0.0)[:, :, None]
    chol, info = torch.linalg.cholesky_ex(A)
    w = torch.cholesky_solve(rhs, chol)[:, :, 0]
    finite_system = torch.isfinite(A).flatten(1).all(dim=1) & torch.isfinite(rhs).flatten(1).all(dim=1)
    retry = ((info != 0) | ~torch.isfinite(w).all(dim=1)) & finite_system
    if bool(retry.any()):
        idx = retry.nonzero()[:, 0]
        w[idx] = (torch.linalg.pinv(A[idx]) @ rhs[idx])[:, :, 0]
    return torch.where(finite_system[:, None], w, float("nan"))


def replace_non_finite(w: Tensor, lower: float, upper: float) -> Tensor:
    """NaN/Inf -> clamp(1.0) so they never escape."""
    fallback = min(max(1.0, lower), upper)
    return torch.where(torch.isfinite(w), w, torch.full_like(w, fallback))


def step_size(G: Tensor, col_valid: Tensor, power_iters: int) -> Tensor:
    """eta = 1 / sigma_max(M)^2 per head, sigma_max^2 from power iterations on G (0 where degenerate)."""
    v = col_valid.float()
    v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-30)
    for _ in range(power_iters):
        v = torch.bmm(G, v[:, :, None])[:, :, 0]
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-30)
    top = (v * torch.bmm(G, v[:, :, None])[:, :, 0]).sum(dim=1)  # Rayleigh quotient ~ largest eigenvalue
    ok = torch.isfinite(top) & (top > 0)
    return torch.where(ok, 1.0 / torch.where(ok, top, 1.0), torch.zeros_like(top))


def nnls_pg_ref(
    M: Tensor,
    m: Tensor,
    *,
    lower: float,
    upper: float,
    col_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
    pg_iters: int = 2,
    power_iters: int = 3,
    ridge: float = 1e-6,
    prior: Prior | None = None,
) -> Tensor:
    """Torch implementation (the CPU production path). Returns w [H,t] fp32, 0 at invalid columns."""
    heads, _, cols = M.shape
    M, m = _masked_system(M, m, col_mask, row_mask)
    col_valid = _col_valid(col_mask, heads, cols, M.device)
    G, b = add_prior(*gram_and_rhs(M, m), col_valid, prior)
    w = solve_regularised(G, b, col_valid, ridge)
    w = replace_non_finite(w, lower, upper).clamp(lower, upper)
    if pg_iters > 0:
        eta = step_size(G, col_valid, power_iters)
        for _ in range(pg_iters):
            grad = torch.bmm(G, w[:, :, None])[:, :, 0] - b
            w = replace_non_finite(w - eta[:, None] * grad, lower, upper).clamp(lower, upper)
    return torch.where(col_valid, w, torch.zeros_like(w))


def nnls_pg(
    M: Tensor,
    m: Tensor,
    *,
    lower: float,
    upper: float,
    col_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
    pg_iters: int = 2,
    power_iters: int = 3,
    ridge: float = 1e-6,
    prior: Prior | None = None,
) -> Tensor:
    """Triton projected-gradient loop on CUDA tensors (or when forced), else the torch reference."""
    impl = nnls_pg_triton if use_triton(M, m) else nnls_pg_ref
    return impl(
        M, m, lower=lower, upper=upper, col_mask=col_mask, row_mask=row_mask,
        pg_iters=pg_iters, power_iters=power_iters, ridge=ridge, prior=prior,
    )


# ---------------------------------------------------------------------------------------------------- Triton


def _projected_gradient(
    G_ptr, b_ptr, valid_ptr, w_ptr, scratch_ptr,
    n_cols, lower, upper, fallback, power_iters, pg_iters,
    sg_h, sg_i, sg_j, sb_h, sv_h, sw_h, ss_h, ss_slot,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per head: power iterations for eta = 1/sigma_max^2, then pg_iters projected-gradient steps.

    Every step is a matrix-vector product with G over row blocks; the vector lives in two global scratch slots
    (read one, write the other) with a CTA barrier between steps, since each step needs the whole previous vector.
    """
    head = tl.program_id(0).to(tl.int64)  # offsets of later heads can pass 2^31
    G = G_ptr + head * sg_h
    scratch = scratch_ptr + head * ss_h
    # Power iterations. Slot 0 starts as the indicator of valid columns; each step writes u = G v (unnormalised)
    # and carries 1/||v|| as a scalar.
    n_valid = 0.0
    for r0 in range(0, n_cols, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = tl.load(valid_ptr + head * sv_h + rows, mask=rows < n_cols, other=0) != 0
        tl.store(scratch + rows, tl.where(ok, 1.0, 0.0), mask=rows < n_cols)
        n_valid += tl.sum(tl.where(ok, 1.0, 0.0), axis=0)
    inv_norm = 1.0 / tl.sqrt(tl.maximum(n_valid, 1.0))
    tl.debug_barrier()
    top = 0.0
    for it in range(power_iters + 1):
        src = scratch + (it % 2) * ss_slot
        dst = scratch + ((it + 1) % 2) * ss_slot
        norm_sq = 0.0
        rayleigh = 0.0
        for r0 in range(0, n_cols, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            acc = tl.zeros([BLOCK_R], tl.float32)
            for c0 in range(0, n_cols, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                g = tl.load(G + rows[:, None] * sg_i + cols[None, :] * sg_j,
                            mask=(rows[:, None] < n_cols) & (cols[None, :] < n_cols), other=0.0)
                v = tl.load(src + cols, mask=cols < n_cols, other=0.0, cache_modifier=".cg")
                acc += tl.sum(g * v[None, :], axis=1)
            acc = acc * inv_norm  # = G v for the normalised v
            v_rows = tl.load(src + rows, mask=rows < n_cols, other=0.0, cache_modifier=".cg") * inv_norm
            rayleigh += tl.sum(acc * v_rows, axis=0)
            norm_sq += tl.sum(acc * acc, axis=0)
            tl.store(dst + rows, acc, mask=rows < n_cols)
        top = rayleigh  # the last pass's Rayleigh quotient v^T G v
        inv_norm = 1.0 / tl.maximum(tl.sqrt(norm_sq), 1e-30)
        tl.debug_barrier()
    ok_top = (top > 0) & (top < float("inf"))
    eta = tl.where(ok_top, 1.0 / tl.where(ok_top, top, 1.0), 0.0)
    # Projected gradient: slot 0 <- w, then w <- clamp(w - eta (G w - b)).
    for r0 in range(0, n_cols, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        tl.store(scratch + rows, tl.load(w_ptr + head * sw_h + rows, mask=rows < n_cols, other=0.0), mask=rows < n_cols)
    tl.debug_barrier()
    for it in range(pg_iters):
        src = scratch + (it % 2) * ss_slot
        dst = scratch + ((it + 1) % 2) * ss_slot
        for r0 in range(0, n_cols, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            acc = tl.zeros([BLOCK_R], tl.float32)
            for c0 in range(0, n_cols, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                g = tl.load(G + rows[:, None] * sg_i + cols[None, :] * sg_j,
                            mask=(rows[:, None] < n_cols) & (cols[None, :] < n_cols), other=0.0)
                w = tl.load(src + cols, mask=cols < n_cols, other=0.0, cache_modifier=".cg")
                acc += tl.sum(g * w[None, :], axis=1)
            w_rows = tl.load(src + rows, mask=rows < n_cols, other=0.0, cache_modifier=".cg")
            b_rows = tl.load(b_ptr + head * sb_h + rows, mask=rows < n_cols, other=0.0)
            step = w_rows - eta * (acc - b_rows)
            step = tl.where((step == step) & (tl.abs(step) < float("inf")), step, fallback)
            tl.store(dst + rows, tl.minimum(tl.maximum(step, lower), upper), mask=rows < n_cols)
        tl.debug_barrier()
    final = scratch + (pg_iters % 2) * ss_slot
    for r0 in range(0, n_cols, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = tl.load(valid_ptr + head * sv_h + rows, mask=rows < n_cols, other=0) != 0
        w = tl.load(final + rows, mask=rows < n_cols, other=0.0, cache_modifier=".cg")
        tl.store(w_ptr + head * sw_h + rows, tl.where(ok, w, 0.0), mask=rows < n_cols)


def nnls_pg_triton(
    M: Tensor,
    m: Tensor,
    *,
    lower: float,
    upper: float,
    col_mask: Tensor | None = None,
    row_mask: Tensor | None = None,
    pg_iters: int = 2,
    power_iters: int = 3,
    ridge: float = 1e-6,
    prior: Prior | None = None,
) -> Tensor:
    """Triton gram (M^T M, M^T m streaming over N), torch Cholesky, Triton power + projected-gradient loop."""
    from vllm_compact.kernels.lstsq import transposed_product_triton

    heads, _, cols = M.shape
    col_valid = _col_valid(col_mask, heads, cols, M.device)
    M32 = torch.where(col_valid[:, None, :], M.float(), 0.0)  # an invalid column may hold NaN
    G = transposed_product_triton(M32, None, row_mask)
    b = transposed_product_triton(M32, m.float()[:, :, None], row_mask)[:, :, 0]
    G, b = add_prior(G, b, col_valid, prior)
    w = solve_regularised(G, b, col_valid, ridge)
    w = replace_non_finite(w, lower, upper).clamp(lower, upper).contiguous()
    if cols == 0 or pg_iters <= 0:
        return torch.where(col_valid, w, 0.0)
    b = b.contiguous()
    valid_i8 = col_valid.to(torch.int8).contiguous()
    scratch = torch.empty(heads, 2, cols, dtype=torch.float32, device=M.device)
    jit(_projected_gradient)[(heads,)](
        G, b, valid_i8, w, scratch, cols, float(lower), float(upper), min(max(1.0, lower), upper),
        int(power_iters), int(pg_iters), *G.stride(), b.stride(0), valid_i8.stride(0), w.stride(0),
        scratch.stride(0), scratch.stride(1),
        BLOCK_R=64, BLOCK_C=min(128, max(16, next_power_of_2(cols))), num_warps=8,
    )
    return w
