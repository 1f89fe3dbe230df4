"""Dense fp32 attention of reference queries over a span or over its selected entries.

Logits are accumulated in fp32 (inputs up-cast), masked to -inf where a key is invisible (padding, causal), and
every exp is taken after subtracting a per-query stabiliser, so huge logits never overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_compact.am.types import HeadBatch

NEG_INF = float("-inf")
# fp32 elements of one logits tile of the reference pass: 2 MiB stays in a CPU core's L2 (measured ~1.5x faster
# than 16 MiB tiles); a GPU wants few large launches instead.
CPU_TILE_ELEMENTS = 1 << 19
GPU_TILE_ELEMENTS = 1 << 26


@dataclass
class Visibility:
    """Which queries see which keys: validity of both plus the optional causal positions."""

    query_valid: Tensor  # [H,N] bool
    key_valid: Tensor  # [H,K] bool
    query_pos: Tensor | None  # [H,N] int64
    key_pos: Tensor | None  # [H,K] int64

    def tile(self, heads: slice, rows: slice) -> Tensor | None:
        """[h,n,K] bool visibility of a tile of heads x query rows; None when everything in it is visible."""
        causal = self.query_pos is not None and self.key_pos is not None
        if not causal and bool(self.query_valid[heads, rows].all()) and bool(self.key_valid[heads].all()):
            return None
        visible = self.query_valid[heads, rows, None] & self.key_valid[heads, None, :]
        if self.query_pos is not None and self.key_pos is not None:
            visible = visible & (self.key_pos[heads, None, :] <= self.query_pos[heads, rows, None])
        return visible

    def sees_any_key(self) -> Tensor:
        """[H,N] bool: valid queries with at least one visible key (cheap: compares with the earliest key)."""
        if self.query_pos is None or self.key_pos is None:
            return self.query_valid & self.key_valid.any(dim=1, keepdim=True)
        big = torch.iinfo(torch.int64).max
        earliest = torch.where(self.key_valid, self.key_pos, big).amin(dim=1, keepdim=True)
        return self.query_valid & (self.query_pos >= earliest)


def span_visibility(batch: HeadBatch) -> Visibility:
    device = batch.device
    return Visibility(
        query_valid=batch.query_valid(),
        key_valid=batch.key_valid(),
        query_pos=None if batch.query_pos is None else batch.query_pos.to(device=device, dtype=torch.int64),
        key_pos=None if batch.key_pos is None else batch.key_pos.to(device=device, dtype=torch.int64),
    )


def masked_logits(
    queries: Tensor, keys: Tensor, scale: Tensor, bias: Tensor | None, visible: Tensor | None
) -> Tensor:
    """s q.k + bias in fp32 [h,n,K]; -inf where not visible (`visible` None: all visible)."""
    logits = torch.bmm(queries.float(), keys.float().transpose(1, 2))
    logits.mul_(scale[:, None, None])
    if bias is not None:
        logits.add_(bias[:, None, :])
    return logits if visible is None else logits.masked_fill_(~visible, NEG_INF)


def safe_row_max(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Row max over the last dim and a copy with 0 where a row sees nothing (so exp(l - max) stays 0 there)."""
    row_max = logits.amax(dim=-1)
    return row_max, torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))


def softmax_rows(logits: Tensor) -> Tensor:
    """Softmax over the last dim; rows with no visible entry are all zero (not NaN).

    Only an all -inf row yields NaN here: callers flag non-finite inputs per head before trusting a result.
    """
    return torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)


@dataclass
class ReferenceAttention:
    """The span's original attention for every reference query (fp32)."""

    row_max: Tensor  # [H,N] max visible logit (-inf for blind or invalid rows)
    lse: Tensor  # [H,N] natural-log logsumexp over visible keys (-inf for blind rows)
    output: Tensor  # [H,N,D] softmax(s Q K^T + bias) V (0 for blind rows)
    key_scores: Tensor | None = None  # [H,K] attention of the scored rows reduced per key (when asked for)


SCORE_REDUCTIONS = ("rms", "mean", "max")


@dataclass
class ScoreRequest:
    """Per-key scores to accumulate during the reference pass: `reduce` of the attention probabilities of `rows`."""

    reduce: str  # rms | mean | max
    rows: Tensor  # [H,N] bool: the queries whose attention is reduced (e.g. the fit rows)

    def __post_init__(self) -> None:
        if self.reduce not in SCORE_REDUCTIONS:
            raise ValueError(f"reduce must be one of {SCORE_REDUCTIONS}, got {self.reduce!r}")


def reference_attention(
    batch: HeadBatch, visibility: Visibility, scores: ScoreRequest | None = None
) -> ReferenceAttention:
    """Output, lse and row max of the span for every reference query, plus the per-key scores when asked for.

    On CPU without causal positions the output and lse come from torch's fused flash-attention kernel and one
    more pass gives the row max and scores (`fused_reference_attention`); otherwise dense tiles do everything.
    """
    if batch.device.type == "cpu" and visibility.query_pos is None and _CPU_FLASH is not None:
        return fused_reference_attention(batch, visibility, scores)
    return tiled_reference_attention(batch, visibility, scores)


def tiled_reference_attention(
    batch: HeadBatch, visibility: Visibility, scores: ScoreRequest | None = None
) -> ReferenceAttention:
    """Local output, lse and row max of the span, in cache-sized tiles of heads x queries.

    With `scores`, the same pass also reduces each key's attention probability over the requested rows (the
    selection scores of highest-attention AM), so the logits are computed once instead of three times.
    """
    heads, n_queries, _ = batch.queries.shape
    n_keys = batch.keys.shape[1]
    device = batch.device
    scale = batch.scale_per_head()
    bias = None if batch.key_bias is None else batch.bias_or_zero()
    keys = batch.keys.float()
    values = batch.values.float()
    row_max = torch.full((heads, n_queries), NEG_INF, device=device)
    lse = torch.full((heads, n_queries), NEG_INF, device=device)
    output = torch.zeros(heads, n_queries, values.shape[2], device=device)
    accum = None if scores is None else torch.zeros(heads, n_keys, device=device)
    tile_elements = GPU_TILE_ELEMENTS if device.type == "cuda" else CPU_TILE_ELEMENTS
    rows_per_tile = max(1, tile_elements // n_keys)
    heads_per_tile = max(1, tile_elements // (n_keys * max(1, n_queries)))
    for h0 in range(0, heads, heads_per_tile):
        hs = slice(h0, min(heads, h0 + heads_per_tile))
        for r0 in range(0, n_queries, rows_per_tile):
            rs = slice(r0, min(n_queries, r0 + rows_per_tile))
            logits = masked_logits(
                batch.queries[hs, rs], keys[hs], scale[hs], None if bias is None else bias[hs], visibility.tile(hs, rs)
            )
            tile_max, stabiliser = safe_row_max(logits)
            weights = logits.sub_(stabiliser[..., None]).exp_()
            total = weights.sum(dim=-1)
            safe_total = torch.where(total > 0, total, 1.0)
            row_max[hs, rs] = tile_max
            lse[hs, rs] = stabiliser + torch.log(total)
            output[hs, rs] = torch.bmm(weights, values[hs]) / safe_total[..., None]
            if accum is not None:
                # probabilities of the scored rows only (others zeroed; blind rows are all zero already)
                probs = weights.mul_((scores.rows[hs, rs] / safe_total)[..., None])
                accum[hs] = _accumulate(accum[hs], probs, scores.reduce)
    return ReferenceAttention(row_max=row_max, lse=lse, output=output, key_scores=_finish_scores(accum, scores, lse))


# The CPU flash-attention kernel behind F.scaled_dot_product_attention; unlike the public function it also returns
# the log-sum-exp. Private to aten, hence looked up once and optional.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_reference_attention(
    batch: HeadBatch, visibility: Visibility, scores: ScoreRequest | None = None
) -> ReferenceAttention:
    """`tiled_reference_attention` without causal positions, from the fused CPU kernel plus one pass over logits.

    The kernel never writes the N x K logits, so output and lse cost about one matmul. The row max and the scores
    need the logits once more: each tile is computed already shifted by the row's lse (and scaled by the power the
    reduction needs, 2 for rms) in one baddbmm, so exp of it is p or p^2 directly, and the scored rows are summed
    by a matrix-vector product instead of a mask pass.
    """
    heads, n_queries, _ = batch.queries.shape
    n_keys = batch.keys.shape[1]
    device = batch.device
    # one softmax scale per head, folded into the queries (the kernel takes one scale for all heads)
    queries = batch.queries.float() * batch.scale_per_head()[:, None, None]
    keys = batch.keys.float()
    values = batch.values.float()
    additive = None  # [H,1,K] existing bias, -inf at padded keys
    if batch.key_bias is not None or not bool(visibility.key_valid.all()):
        additive = batch.bias_or_zero().masked_fill(~visibility.key_valid, NEG_INF)[:, None, :]
    output, lse = _CPU_FLASH(
        queries[None], keys[None], values[None], 0.0, False,
        attn_mask=None if additive is None else additive[None], scale=1.0,
    )
    output, lse = output[0], lse[0]
    sees = visibility.query_valid & visibility.key_valid.any(dim=1, keepdim=True)
    lse = lse.masked_fill(~sees, NEG_INF)
    output = output.masked_fill(~sees[:, :, None], 0.0)
    shift = torch.where(sees, lse, float("inf"))  # rows that see nothing: every shifted logit is -inf

    power = 2.0 if scores is not None and scores.reduce == "rms" else 1.0
    row_max = torch.full((heads, n_queries), NEG_INF, device=device)
    accum = None if scores is None else torch.zeros(heads, n_keys, device=device)
    keys_t = keys.transpose(1, 2)
    rows_per_tile = max(1, CPU_TILE_ELEMENTS // n_keys)
    for h in range(heads):
        hs = slice(h, h + 1)
        for r0 in range(0, n_queries, rows_per_tile):
            rs = slice(r0, min(n_queries, r0 + rows_per_tile))
            # power * (s q.k + bias - lse): exp of it is the attention probability to that power
            shifted = torch.baddbmm(shift[hs, rs, None], queries[hs, rs], keys_t[hs], beta=-power, alpha=power)
            if additive is not None:
                shifted.add_(additive[hs], alpha=power)
            row_max[hs, rs] = shifted.amax(dim=-1) / power + shift[hs, rs]
            if accum is None:
                continue
            probs = shifted.exp_()
            scored = (scores.rows[hs, rs] & sees[hs, rs]).float()
            if scores.reduce == "max":
                accum[hs] = torch.maximum(accum[hs], probs.mul_(scored[:, :, None]).amax(dim=1))
            else:
                accum[hs] += torch.bmm(scored[:, None, :], probs)[:, 0]
    row_max = row_max.masked_fill(~sees, NEG_INF)
    return ReferenceAttention(row_max=row_max, lse=lse, output=output, key_scores=_finish_scores(accum, scores, lse))


def _finish_scores(accum: Tensor | None, scores: ScoreRequest | None, lse: Tensor) -> Tensor | None:
    """Accumulated per-key sums -> the requested reduction (mean over the scored rows that see a key)."""
    if accum is None:
        return None
    counted = (scores.rows & torch.isfinite(lse)).sum(dim=1).clamp(min=1).float()[:, None]
    key_scores = accum if scores.reduce == "max" else accum / counted
    return key_scores.sqrt_() if scores.reduce == "rms" else key_scores


def _accumulate(accum: Tensor, probs: Tensor, reduce: str) -> Tensor:
    if reduce == "rms":
        return accum + probs.square_().sum(dim=1)
    if reduce == "mean":
        return accum + probs.sum(dim=1)
    return torch.maximum(accum, probs.amax(dim=1))
