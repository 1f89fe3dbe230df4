"""Steps 2 and 3 of AM on selected keys (beta by bounded NNLS on the mass, C2 by ridge least squares on the
output), and the per-head guard that falls back to eviction where the fit is broken or generalises worse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_compact.am.attention import ReferenceAttention, Visibility, masked_logits, safe_row_max, softmax_rows
from vllm_compact.am.selection import Entries
from vllm_compact.am.types import CompactedHeads, HeadBatch
from vllm_compact.kernels import nnls_pg, value_lstsq_path


@dataclass
class QueryRows:
    """Which reference queries fit the compaction and which judge it (held out)."""

    fit: Tensor  # [H,N] bool
    heldout: Tensor  # [H,N] bool

    def select_heads(self, heads: slice) -> QueryRows:
        return QueryRows(fit=self.fit[heads], heldout=self.heldout[heads])


def split_queries(eligible: Tensor, holdout_fraction: float, seed: int) -> QueryRows:
    """Seeded random hold-out of floor(fraction * n) eligible queries per head; at least one query stays to fit."""
    heads, n_queries = eligible.shape
    count = eligible.sum(dim=1)
    n_held = torch.floor(count.double() * holdout_fraction).long().clamp(min=0)
    n_held = torch.minimum(n_held, (count - 1).clamp(min=0))
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(heads, n_queries, generator=generator).to(eligible.device)
    draw = draw.masked_fill(~eligible, 2.0)  # ineligible rows rank last, never held out
    rank = draw.argsort(dim=1).argsort(dim=1)
    heldout = rank < n_held[:, None]
    return QueryRows(fit=eligible & ~heldout, heldout=heldout)


def entry_logits(batch: HeadBatch, entries: Entries, visibility: Visibility) -> Tensor:
    """[H,N,t] fp32 logits s q.c + existing bias of every reference query over the selected entries."""
    entry_view = Visibility(
        query_valid=visibility.query_valid, key_valid=entries.valid, query_pos=visibility.query_pos, key_pos=entries.pos
    )
    every = slice(None)
    visible = entry_view.tile(every, every)
    return masked_logits(batch.queries, entries.keys, batch.scale_per_head(), entries.bias, visible)


def fit_log_weights(
    logits: Tensor,
    entries: Entries,
    reference: ReferenceAttention,
    fit_rows: Tensor,
    bounds: tuple[float, float],
    pg_iters: int,
    ridge: float,
    prior_ridge: float = 0.0,
) -> Tensor:
    """log w [H,t] (0 at padding) from min ||M w - m||^2 + lam ||w - c||^2 with w in bounds,
    M = exp(logits - rowmax), m = exp(lse - rowmax) on the fit rows.

    c is the head's uniform rescaling (total mass of the span / mass of the kept keys over the fit rows) and
    lam = prior_ridge x the mean diagonal of M^T M: the per-key weights only depart from a uniform rescaling where
    the reference queries ask for it. Unregularised per-key weights (prior_ridge 0, the paper's NNLS) overfit the
    reference queries: on SmolLM2 their held-out mass error was worse than plain eviction's. The prior is a term of the
    same bounded NNLS (kernels.nnls_pg `prior`). `ridge` is the relative ridge of its unconstrained least-squares
    start (before clamping and PG steps).
    """
    # Only the fit rows enter the system: gather them first (held-out rows would be zero rows of M).
    index, in_fit = row_subset(fit_rows & torch.isfinite(reference.lse))
    row_max = torch.gather(reference.row_max, 1, index)
    stabiliser = torch.where(torch.isfinite(row_max), row_max, 0.0)
    # exp(-inf) = 0 at invalid entries and blind rows, so only padded fit rows need zeroing
    mass_matrix = (gather_rows(logits, index) - stabiliser[:, :, None]).exp_().masked_fill_(~in_fit[:, :, None], 0.0)
    target = torch.exp(torch.gather(reference.lse, 1, index) - stabiliser).masked_fill_(~in_fit, 0.0)
    prior = _uniform_prior(mass_matrix, target, entries.valid, bounds, prior_ridge) if prior_ridge > 0 else None
    weight = nnls_pg(
        mass_matrix, target, lower=bounds[0], upper=bounds[1], col_mask=entries.valid, row_mask=in_fit,
        pg_iters=pg_iters, ridge=ridge, prior=prior,
    )
    return torch.where(entries.valid, torch.log(weight.clamp(min=bounds[0])), 0.0)


def _uniform_prior(
    mass_matrix: Tensor, target: Tensor, col_valid: Tensor, bounds: tuple[float, float], prior_ridge: float
) -> tuple[Tensor, Tensor]:
    """(lam [H], c [H,t]) of fit_log_weights' prior term lam ||w - c||^2 (M and m zero outside the fit system)."""
    scale = target.sum(dim=1) / mass_matrix.sum(dim=(1, 2))
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0).clamp(bounds[0], bounds[1])
    diagonal = mass_matrix.square().sum(dim=1)  # [H,t] diag of M^T M over the fit rows
    lam = prior_ridge * diagonal.sum(dim=1) / col_valid.sum(dim=1).clamp(min=1)
    return lam, scale[:, None].expand_as(col_valid)


@dataclass
class ValueFit:
    """C2 and the attention weights of the fitted compact entries."""

    values: Tensor  # [H,t,D] fp32
    failed: Tensor  # [H] bool
    heldout_error: Tensor  # [H] squared output error of the chosen C2 on the held-out rows (0 without any)


def fit_values(
    logits: Tensor,
    log_weight: Tensor,
    entries: Entries,
    reference: ReferenceAttention,
    rows: QueryRows,
    ridges: tuple[float, ...],
    shrink_to_original: bool,
) -> ValueFit:
    """C2 = argmin ||X C2 - Y||^2 + lam ||C2 - P||^2 over the fit rows, X = softmax(logits + log w), Y = the
    span's original output, P = the kept keys' original values (`shrink_to_original`) or 0 (the paper's ridge).

    Shrinking towards the original values instead of towards 0 means a strong ridge degrades to eviction values
    with fitted beta, not to nothing. Each head takes the ridge of `ridges` (relative, see kernels.value_lstsq)
    whose solution has the lowest error on its held-out rows; ties (e.g. no held-out rows) keep the first. With
    a prior, "C2 = P" is a candidate too.
    """
    attention = softmax_rows(logits + log_weight[:, None, :])
    covered = covered_rows(logits)
    prior = entries.values.float() if shrink_to_original else torch.zeros(entries.values.shape, device=logits.device)
    residual = reference.output - torch.bmm(attention, prior)  # what C2 - P still has to explain
    solutions = value_lstsq_path(attention, residual, ridges, col_mask=entries.valid, row_mask=rows.fit & covered)
    index, judged = row_subset(rows.heldout & covered)
    held_attention, held_residual = gather_rows(attention, index), gather_rows(residual, index)
    heads = logits.shape[0]
    best_error = torch.full((heads,), float("inf"), device=logits.device)
    best = torch.zeros_like(prior)
    for result in solutions:
        error = squared_output_error(held_attention, result.solution, held_residual, judged)
        error = torch.where(result.failed | ~torch.isfinite(error), float("inf"), error)
        better = error < best_error
        best = torch.where(better[:, None, None], result.solution, best)
        best_error = torch.where(better, error, best_error)
    failed = ~torch.isfinite(best_error)
    if shrink_to_original:
        prior_error = squared_output_error(held_attention, torch.zeros_like(best), held_residual, judged)
        keep_prior = judged.any(dim=1) & (prior_error < best_error) & ~failed
        best = best.masked_fill(keep_prior[:, None, None], 0.0)
        best_error = torch.where(keep_prior, prior_error, best_error)
    values = (prior + best).masked_fill(~entries.valid[:, :, None], 0.0)
    broken = ~torch.isfinite(values).flatten(1).all(dim=1)
    return ValueFit(values=values, failed=failed | broken, heldout_error=best_error)


def original_values(
    logits: Tensor, log_weight: Tensor, entries: Entries, reference: ReferenceAttention, rows: QueryRows
) -> ValueFit:
    """C2 = the kept keys' original values (no refit), with its held-out error for the guard."""
    values = entries.values.float().masked_fill(~entries.valid[:, :, None], 0.0)
    index, judged = row_subset(rows.heldout & covered_rows(logits))
    attention = softmax_rows(gather_rows(logits, index) + log_weight[:, None, :])  # only the judged rows
    error = squared_output_error(attention, values, gather_rows(reference.output, index), judged)
    failed = ~torch.isfinite(values).flatten(1).all(dim=1)
    return ValueFit(values=values, failed=failed, heldout_error=error)


def covered_rows(logits: Tensor) -> Tensor:
    """[H,N] bool: queries that see at least one selected entry."""
    row_max, _ = safe_row_max(logits)
    return torch.isfinite(row_max)


def row_subset(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Indices [H,n] of each head's selected rows (padded with row 0) and their validity [H,n]."""
    count = rows.sum(dim=1)
    n = int(count.max()) if rows.numel() > 0 else 0
    index = rows.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :n]
    return index, torch.arange(n, device=rows.device)[None, :] < count[:, None]


def gather_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor [H,N,X] -> [H,n,X] at row indices [H,n]."""
    return torch.gather(tensor, 1, index[:, :, None].expand(-1, -1, tensor.shape[2]))


def squared_output_error(attention: Tensor, values: Tensor, target: Tensor, rows: Tensor) -> Tensor:
    """[H] sum over `rows` of ||attention @ values - target||^2 (fp32)."""
    diff = torch.bmm(attention, values.float()) - target
    return diff.square().sum(dim=2).masked_fill(~rows, 0.0).sum(dim=1)


def non_finite_heads(batch: HeadBatch) -> Tensor:
    """[H] bool: NaN/Inf anywhere in the valid part of the inputs."""
    key_valid = batch.key_valid()
    query_valid = batch.query_valid()

    def broken(tensor: Tensor, valid: Tensor) -> Tensor:
        # One reduction instead of an elementwise mask: a NaN/Inf element makes its row sum non-finite
        # (a finite row of cache values cannot overflow fp32).
        sums = tensor.sum(dim=2, dtype=torch.float32) if tensor.dim() == 3 else tensor.float()
        return (~torch.isfinite(sums) & valid).any(dim=1)

    bad = broken(batch.keys, key_valid) | broken(batch.values, key_valid) | broken(batch.queries, query_valid)
    if batch.key_bias is not None:
        bad = bad | broken(batch.key_bias, key_valid)
    return bad


@dataclass
class GuardDecision:
    """Per-head verdict on an AM solution."""

    broken: Tensor  # [H] bool: NaN/Inf/singular, or nothing to fit on -> eviction with SnapKV's selection
    worse_than_eviction: Tensor  # [H] bool: held-out output error above eviction with the same keys


def judge(
    batch: HeadBatch,
    entries: Entries,
    logits: Tensor,
    log_weight: Tensor,
    fit: ValueFit,
    reference: ReferenceAttention,
    rows: QueryRows,
) -> GuardDecision:
    covered = covered_rows(logits)
    nothing_to_fit = ~(rows.fit & covered).any(dim=1)
    weights_broken = ~torch.isfinite(log_weight).all(dim=1)
    broken = non_finite_heads(batch) | fit.failed | weights_broken | nothing_to_fit
    index, judged = row_subset(rows.heldout & covered)  # only the held-out rows are evaluated
    target = gather_rows(reference.output, index)
    am_error = fit.heldout_error  # ||X C2 - Y||^2 on the same rows, from choosing the ridge
    eviction_attention = softmax_rows(gather_rows(logits, index))
    eviction_error = squared_output_error(eviction_attention, entries.values, target, judged)
    broken = broken | ~torch.isfinite(am_error)
    worse = judged.any(dim=1) & (eviction_error < am_error) & ~broken
    return GuardDecision(broken=broken, worse_than_eviction=worse)


def am_result(entries: Entries, log_weight: Tensor, values: Tensor) -> CompactedHeads:
    """CompactedHeads of fitted entries: beta = existing bias + log w, C2 cast to the model dtype."""
    beta = (entries.bias + log_weight).masked_fill(~entries.valid, float("-inf"))
    heads = entries.indices.shape[0]
    return CompactedHeads(
        indices=entries.indices,
        keys=entries.keys,
        beta=beta,
        values=values.to(entries.values.dtype).masked_fill(~entries.valid[:, :, None], 0),
        length=entries.length,
        fell_back=torch.zeros(heads, dtype=torch.bool, device=entries.indices.device),
    )


def eviction_result(entries: Entries, fell_back: bool | Tensor = False) -> CompactedHeads:
    """CompactedHeads keeping the original keys/values; beta = their existing bias (0 without re-compaction)."""
    heads = entries.indices.shape[0]
    flags = torch.as_tensor(fell_back, dtype=torch.bool, device=entries.indices.device).expand(heads).clone()
    return CompactedHeads(
        indices=entries.indices,
        keys=entries.keys,
        beta=entries.bias.masked_fill(~entries.valid, float("-inf")),
        values=entries.values,
        length=entries.length,
        fell_back=flags,
    )
