"""Step 1 of AM and the whole of eviction: choosing which original keys stay (batched, variable budgets)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vllm_compact.am.attention import NEG_INF
from vllm_compact.am.types import HeadBatch
from vllm_compact.kernels import key_scores

# Finite stand-in for non-finite scores: such keys rank below every real score but above padding (-inf).
_WORST_SCORE = -3.0e38


@dataclass
class Entries:
    """Selected original keys of every head, padded to the largest budget."""

    indices: Tensor  # [H,t] int64 positions into T (-1 padding)
    valid: Tensor  # [H,t] bool slot < length
    keys: Tensor  # [H,t,D] model dtype (0 at padding)
    values: Tensor  # [H,t,D] model dtype (0 at padding)
    bias: Tensor  # [H,t] fp32 existing beta of the kept keys (0 at padding or without re-compaction)
    pos: Tensor | None  # [H,t] int64 positions of the kept keys (causal option)

    @property
    def length(self) -> Tensor:
        return self.valid.sum(dim=1)

    def select_heads(self, heads: Tensor) -> Entries:
        return Entries(
            indices=self.indices[heads],
            valid=self.valid[heads],
            keys=self.keys[heads],
            values=self.values[heads],
            bias=self.bias[heads],
            pos=None if self.pos is None else self.pos[heads],
        )


def gather_entries(batch: HeadBatch, indices: Tensor) -> Entries:
    """Entries at `indices` ([H,t], -1 = padding)."""
    valid = indices >= 0
    safe = indices.clamp(min=0)
    dim = batch.keys.shape[2]

    def rows(tensor: Tensor) -> Tensor:
        picked = torch.gather(tensor, 1, safe[:, :, None].expand(-1, -1, dim))
        return picked.masked_fill(~valid[:, :, None], 0)

    bias = torch.gather(batch.bias_or_zero(), 1, safe).masked_fill(~valid, 0.0)
    pos = None if batch.key_pos is None else torch.gather(batch.key_pos.to(safe.device), 1, safe)
    return Entries(indices=indices, valid=valid, keys=rows(batch.keys), values=rows(batch.values), bias=bias, pos=pos)


def top_budget(scores: Tensor, key_valid: Tensor, budget: Tensor) -> Tensor:
    """[H, max budget] int64: the `budget[h]` best-scoring valid keys of each head, ascending, -1 padded."""
    ranked = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, _WORST_SCORE))
    ranked = ranked.masked_fill(~key_valid, NEG_INF)
    tmax = int(budget.max())
    top = ranked.topk(tmax, dim=1).indices
    keep = torch.arange(tmax, device=scores.device)[None, :] < budget[:, None]
    return sorted_with_padding(torch.where(keep, top, -1))


def mark_keys(keys: Tensor, mark: Tensor, n_keys: int) -> Tensor:
    """[H, n_keys] bool: True at keys[h, j] where mark[h, j] (unmarked entries may hold any index, e.g. -1 padding).

    Unmarked entries scatter into a scratch column: a plain scatter of `mark` would let an unmarked duplicate of a
    marked key overwrite its True (which write wins is unspecified)."""
    marks = torch.zeros(keys.shape[0], n_keys + 1, dtype=torch.bool, device=keys.device)
    return marks.scatter_(1, torch.where(mark, keys, n_keys), True)[:, :n_keys]


def sorted_with_padding(indices: Tensor) -> Tensor:
    """Sort each row's indices ascending, keeping -1 padding at the end."""
    big = torch.iinfo(torch.int64).max
    ordered = torch.where(indices >= 0, indices, big).sort(dim=1).values
    return torch.where(ordered == big, -1, ordered)


def max_pool_positions(scores: Tensor, key_valid: Tensor, kernel: int) -> Tensor:
    """SnapKV-style max-pooling of scores over neighbouring positions (odd kernel; 0 or 1 = off)."""
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd, got {kernel}")
    masked = scores.masked_fill(~key_valid, NEG_INF)
    pooled = F.max_pool1d(masked[:, None, :], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0, :]
    return pooled.masked_fill(~key_valid, 0.0)


FOLLOW_DECAY = 1e-3  # per token of distance: ties of a carried score break towards the key it came from


def carry_forward(scores: Tensor, key_valid: Tensor, window: int) -> Tensor:
    """Each key also takes the score of the `window` keys before it, discounted by FOLLOW_DECAY per token (0 = off),
    so the tokens that follow a chosen key are kept with it: a fact is read by the queries that write it, token
    after token, while the reference queries (the question) look only at where it starts. Scores are >= 0."""
    if window <= 0:
        return scores
    masked = scores.masked_fill(~key_valid, 0.0)
    pooled = masked.clone()
    for distance in range(1, min(window, scores.shape[1] - 1) + 1):
        carried = masked[:, :-distance] * (1.0 - FOLLOW_DECAY * distance)
        pooled[:, distance:] = torch.maximum(pooled[:, distance:], carried)
    return pooled.masked_fill(~key_valid, 0.0)


def attention_scores(batch: HeadBatch, reduce: str, pool_kernel: int) -> Tensor:
    """[H,T] per-key attention score of the reference queries (kernels.key_scores), optionally pooled."""
    result = key_scores(
        batch.queries,
        batch.keys,
        batch.scale_per_head(),
        query_len=batch.query_len,
        key_len=batch.key_len,
        key_bias=batch.key_bias,
        query_pos=batch.query_pos,
        key_pos=batch.key_pos,
        reduce=reduce,
    )
    return max_pool_positions(result.scores, batch.key_valid(), pool_kernel)


def recency_scores(batch: HeadBatch) -> Tensor:
    """[H,T] larger = newer: the key position when given, else the index in the span."""
    if batch.key_pos is not None:
        return batch.key_pos.to(device=batch.device, dtype=torch.float64)
    n_keys = batch.keys.shape[1]
    return torch.arange(n_keys, device=batch.device, dtype=torch.float64)[None, :].expand(batch.num_heads, n_keys)


DISTINCT_METRICS = ("cosine", "leverage")
LEVERAGE_RIDGE = 1e-3  # relative to the mean key variance: keeps the covariance invertible on short spans


def distinct_scores(batch: HeadBatch, metric: str = "cosine") -> Tensor:
    """[H,T] how unlike the span's other keys each key is, on `content_keys` when given (RoPE undone), else on the
    stored keys. cosine: 1 - cosine similarity to the head's mean valid key (KeyDiff, Park et al. 2025); leverage:
    the key's Mahalanobis distance from that mean under the keys' own covariance (statistical leverage, as in
    Compactor, Chari et al. 2025), which also sees a key that is rare along a direction of little variance.

    Query-agnostic: a fact the essay never returns to (a name, a number) has keys that no later query of the essay
    looks for, but they stand out from the essay's own keys. Rotated keys hide this: their similarity is mostly
    that of their positions (SmolLM2 needle prompts, the needle's digit keys that rank
    within a 10x budget: 14-21% of them on rotated keys, 34-36% unrotated, mean over heads)."""
    if metric not in DISTINCT_METRICS:
        raise ValueError(f"distinct metric must be one of {DISTINCT_METRICS}, got {metric!r}")
    keys = (batch.keys if batch.content_keys is None else batch.content_keys).float()
    valid = batch.key_valid()
    mean = (keys * valid[:, :, None]).sum(1) / valid.sum(1).clamp(min=1)[:, None].to(keys.dtype)
    if metric == "leverage":
        return _leverage(keys.double(), valid, mean.double()).float()
    similarity = F.cosine_similarity(keys, mean[:, None, :].expand_as(keys), dim=-1)
    return (1.0 - similarity).masked_fill(~valid, 0.0)


def _leverage(keys: Tensor, valid: Tensor, mean: Tensor) -> Tensor:
    """[H,T] (k - mean)^T (C + ridge)^-1 (k - mean), C the covariance of the head's valid keys (0 at padding)."""
    centred = (keys - mean[:, None, :]).masked_fill(~valid[:, :, None], 0.0)
    count = valid.sum(1).clamp(min=1).to(keys.dtype)
    cov = centred.transpose(1, 2) @ centred / count[:, None, None]
    dim = keys.shape[2]
    ridge = LEVERAGE_RIDGE * cov.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)
    cov = cov + ridge[:, None, None] * torch.eye(dim, dtype=keys.dtype, device=keys.device)
    whitened = torch.linalg.solve(cov, centred.transpose(1, 2)).transpose(1, 2)
    return (whitened * centred).sum(-1).masked_fill(~valid, 0.0)


def top_budget_with_distinct(scores: Tensor, batch: HeadBatch, key_valid: Tensor, follow_tokens: int, share: float,
                             metric: str) -> Tensor:
    """[H, max budget]: `share` of each head's budget by distinct_scores (carried forward like `scores`), the rest by
    `scores` (top_budget_shared; share 0 = top_budget on `scores` alone)."""
    if share <= 0:
        return top_budget(scores, key_valid, batch.budget_per_head())
    distinct = carry_forward(distinct_scores(batch, metric), key_valid, follow_tokens)
    return top_budget_shared(scores, distinct, key_valid, batch.budget_per_head(), share)


def top_budget_shared(first: Tensor, second: Tensor, key_valid: Tensor, budget: Tensor, second_share: float) -> Tensor:
    """[H, max budget]: floor(second_share x budget) keys by `second`, the rest by `first` (chosen first), disjoint,
    ascending, -1 padded."""
    if second_share <= 0:
        return top_budget(first, key_valid, budget)
    second_budget = torch.floor(budget.double() * second_share).long()
    chosen = top_budget(first, key_valid, budget - second_budget)
    taken = mark_keys(chosen, chosen >= 0, key_valid.shape[1])
    added = top_budget(second, key_valid & ~taken, second_budget)
    merged = sorted_with_padding(torch.cat([chosen, added], dim=1))
    return merged[:, : max(1, int(budget.max()))]


def all_keys(batch: HeadBatch) -> Tensor:
    """[H, max key_len] every valid key (the "none" method)."""
    key_len = batch.key_lengths()
    positions = torch.arange(int(key_len.max()), device=batch.device)[None, :]
    return torch.where(positions < key_len[:, None], positions, -1)
