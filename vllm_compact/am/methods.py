"""Compaction methods behind one interface (a dataclass of options per method, a registry by name).

Every method compacts a whole HeadBatch (all heads of all layers) in batched tensor ops; Python loops run only
over chunks of many heads (memory) and over OMP steps, never over single heads.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from vllm_compact.am.attention import (
    ReferenceAttention,
    ScoreRequest,
    Visibility,
    reference_attention,
    span_visibility,
)
from vllm_compact.am.fitting import (
    GuardDecision,
    QueryRows,
    am_result,
    entry_logits,
    eviction_result,
    fit_log_weights,
    fit_values,
    judge,
    original_values,
    split_queries,
)
from vllm_compact.am.omp import OmpSettings, omp_select
from vllm_compact.am.selection import (
    Entries,
    all_keys,
    attention_scores,
    carry_forward,
    gather_entries,
    mark_keys,
    max_pool_positions,
    recency_scores,
    top_budget,
    top_budget_with_distinct,
)
from vllm_compact.am.types import CompactedHeads, HeadBatch, concat_heads

_REGISTRY: dict[str, type[CompactionMethod]] = {}


class CompactionMethod(ABC):
    """Compacts every head of a batch to its budget.

    Capabilities, read by the engine and the config instead of testing names:
    compacts: keeps at most the budget (False: keeps every key, frees nothing);
    needs_queries: selection reads reference queries (False: position-based, works without any);
    fits: beta and values are solved (AM: takes value_ridge), not kept as they were.
    """

    name: ClassVar[str]
    compacts: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = True
    fits: ClassVar[bool] = False

    @abstractmethod
    def compact(self, batch: HeadBatch) -> CompactedHeads: ...


def register(cls: type[CompactionMethod]) -> type[CompactionMethod]:
    _REGISTRY[cls.name] = cls
    return cls


# ---------------------------------------------------------------- eviction: keep K[idx], V[idx], beta unchanged


class EvictionMethod(CompactionMethod):
    """Step 1 alone: keep the selected original keys and values; beta = their existing bias (0 normally)."""

    def compact(self, batch: HeadBatch) -> CompactedHeads:
        batch.validate()
        return eviction_result(gather_entries(batch, self.select(batch)))

    @abstractmethod
    def select(self, batch: HeadBatch) -> Tensor:
        """[H, max budget] int64 kept positions, -1 padded."""


@register
@dataclass
class SnapKV(EvictionMethod):
    """Top keys by attention score (reduced over queries), max-pooled over `pool_kernel` neighbouring positions."""

    name: ClassVar[str] = "snapkv"
    reduce: str = "rms"
    pool_kernel: int = 7
    follow_tokens: int = 0  # keys also keep the score of the follow_tokens keys before them (selection.carry_forward)
    distinct_share: float = 0.0  # share of the budget chosen by key distinctiveness (selection.distinct_scores)
    distinct_metric: str = "cosine"  # selection.DISTINCT_METRICS

    def select(self, batch: HeadBatch) -> Tensor:
        scores = attention_scores(batch, self.reduce, self.pool_kernel)
        scores = carry_forward(scores, batch.key_valid(), self.follow_tokens)
        return top_budget_with_distinct(scores, batch, batch.key_valid(), self.follow_tokens, self.distinct_share,
                                        self.distinct_metric)


@register
@dataclass
class H2O(EvictionMethod):
    """Heavy hitters: top keys by mean attention over the reference queries."""

    name: ClassVar[str] = "h2o"
    reduce: str = "mean"

    def select(self, batch: HeadBatch) -> Tensor:
        scores = attention_scores(batch, self.reduce, pool_kernel=0)
        return top_budget(scores, batch.key_valid(), batch.budget_per_head())


@register
@dataclass
class Recent(EvictionMethod):
    """The newest `budget` keys (largest key_pos when given, else the last in the span)."""

    name: ClassVar[str] = "recent"
    needs_queries: ClassVar[bool] = False

    def select(self, batch: HeadBatch) -> Tensor:
        return top_budget(recency_scores(batch), batch.key_valid(), batch.budget_per_head())


@register
@dataclass
class KeepAll(EvictionMethod):
    """No compaction: every valid key stays (budget ignored, length = key_len)."""

    name: ClassVar[str] = "none"
    compacts: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False

    def compact(self, batch: HeadBatch) -> CompactedHeads:
        batch.validate(check_budget=False)
        return eviction_result(gather_entries(batch, self.select(batch)))

    def select(self, batch: HeadBatch) -> Tensor:
        return all_keys(batch)


# ---------------------------------------------------------------- attention matching: select, fit beta, fit C2


@dataclass
class AttentionMatching(CompactionMethod):
    """Shared AM pipeline; subclasses only choose the keys.

    weight_bounds: bounds on w = exp(beta - existing bias) of the mass NNLS; pg_iters: its projected-gradient steps;
    mass_ridge: relative ridge of its unconstrained least-squares start; mass_prior_ridge: pull of w towards the
    head's uniform rescaling (am.fitting.fit_log_weights; 0 = the paper's plain NNLS).
    value_ridge: relative ridge of the C2 fit; ridge_grid: further ridges tried, each head keeping the one with the
    lowest held-out error; shrink_to_original: the ridge pulls C2 towards the kept keys' original values (else
    towards 0, as in the paper); refit_values: False keeps the kept keys' original values as C2 (beta still fitted).
    holdout_fraction: share of the reference queries held out (seeded by `seed`) to choose the ridge and to compare,
    per head, the fit with eviction of the same keys (0 = no held-out rows: value_ridge alone, no comparison).
    chunk_elements: heads are solved in chunks of about this many query x key pairs (bounds memory).
    """

    fits: ClassVar[bool] = True
    weight_bounds: tuple[float, float] = (math.exp(-3.0), math.exp(3.0))
    pg_iters: int = 2
    mass_ridge: float = 1e-6
    mass_prior_ridge: float = 0.1
    value_ridge: float = 1e-3
    ridge_grid: tuple[float, ...] = (3e-2, 1.0)
    shrink_to_original: bool = True
    refit_values: bool = True
    holdout_fraction: float = 0.25
    seed: int = 0
    chunk_elements: int = 1 << 26

    def __post_init__(self) -> None:
        low, high = self.weight_bounds
        if not 0.0 < low <= high:
            raise ValueError(f"weight_bounds must satisfy 0 < lower <= upper, got {self.weight_bounds}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction}")
        ridges = {"value_ridge": self.value_ridge, "mass_ridge": self.mass_ridge,
                  "mass_prior_ridge": self.mass_prior_ridge, "ridge_grid": min(self.ridge_grid, default=0.0)}
        if any(value < 0 for value in ridges.values()):
            raise ValueError(f"ridges must be >= 0, got {ridges}")

    def score_request(self, rows: QueryRows) -> ScoreRequest | None:
        """Per-key scores select_keys needs from the reference pass (None: it needs none)."""
        return None

    @abstractmethod
    def select_keys(
        self, batch: HeadBatch, visibility: Visibility, reference: ReferenceAttention, rows: QueryRows
    ) -> Tensor:
        """[H, max budget] int64 chosen positions, -1 padded."""

    def compact(self, batch: HeadBatch) -> CompactedHeads:
        batch.validate()
        rows = split_queries(span_visibility(batch).sees_any_key(), self.holdout_fraction, self.seed)
        n_queries, n_keys = batch.queries.shape[1], batch.keys.shape[1]
        step = max(1, self.chunk_elements // max(1, n_queries * n_keys))
        chunks = [slice(h, min(batch.num_heads, h + step)) for h in range(0, batch.num_heads, step)]
        return concat_heads([self.solve(batch.select_heads(c), rows.select_heads(c)) for c in chunks])

    def solve(self, batch: HeadBatch, rows: QueryRows) -> CompactedHeads:
        visibility = span_visibility(batch)
        reference = reference_attention(batch, visibility, self.score_request(rows))
        entries = gather_entries(batch, self.select_keys(batch, visibility, reference, rows))
        logits = entry_logits(batch, entries, visibility)
        log_weight = fit_log_weights(
            logits, entries, reference, rows.fit, self.weight_bounds, self.pg_iters, self.mass_ridge,
            self.mass_prior_ridge,
        )
        if self.refit_values:
            ridges = (self.value_ridge, *self.ridge_grid)
            fit = fit_values(logits, log_weight, entries, reference, rows, ridges, self.shrink_to_original)
        else:
            fit = original_values(logits, log_weight, entries, reference, rows)
        decision = judge(batch, entries, logits, log_weight, fit, reference, rows)
        return apply_guard(am_result(entries, log_weight, fit.values), decision, entries, batch)


def apply_guard(result: CompactedHeads, decision: GuardDecision, entries: Entries, batch: HeadBatch) -> CompactedHeads:
    """Heads worse than eviction keep their keys as plain eviction; broken heads get SnapKV's selection.

    Both keep the original values and the existing bias of the kept keys, with fell_back = True.
    """
    worse = decision.worse_than_eviction.nonzero()[:, 0]
    if worse.numel() > 0:
        result = result.with_heads_replaced(worse, eviction_result(entries.select_heads(worse), fell_back=True))
    broken = decision.broken.nonzero()[:, 0]
    if broken.numel() > 0:
        broken_batch = batch.select_heads(broken)
        snapkv = eviction_result(gather_entries(broken_batch, SnapKV().select(broken_batch)), fell_back=True)
        result = result.with_heads_replaced(broken, snapkv)
    return result


@register
@dataclass
class HighestAttention(AttentionMatching):
    """C1 = the keys with the highest attention score (`reduce` over queries, optional max-pooling)."""

    name: ClassVar[str] = "am-highest-attention"
    reduce: str = "rms"
    pool_kernel: int = 0
    # Keys keep the score of the 16 keys before them (SnapKV.follow_tokens): on SmolLM2-135M needle prompts the
    # question's queries put ~0.1% of their mass on the needle's digits, the answer's writing queries 30-50%; this
    # keeps 84-95% of the digits in the heads the answer reads, against 15-27% without (bench needle-diagnosis).
    follow_tokens: int = 16
    distinct_share: float = 0.0  # share of the budget chosen by key distinctiveness (selection.distinct_scores)
    distinct_metric: str = "cosine"  # selection.DISTINCT_METRICS

    def score_request(self, rows: QueryRows) -> ScoreRequest:
        return ScoreRequest(self.reduce, rows.fit)  # scored on the fit rows only: held-out rows stay unseen

    def select_keys(
        self, batch: HeadBatch, visibility: Visibility, reference: ReferenceAttention, rows: QueryRows
    ) -> Tensor:
        scores = max_pool_positions(reference.key_scores, visibility.key_valid, self.pool_kernel)
        scores = carry_forward(scores, visibility.key_valid, self.follow_tokens)
        return top_budget_with_distinct(scores, batch, visibility.key_valid, self.follow_tokens, self.distinct_share,
                                        self.distinct_metric)


@register
@dataclass
class OrthogonalMatchingPursuit(AttentionMatching):
    """C1 by greedy OMP on the attention mass (see am/omp.py); the final NNLS uses weight_bounds / pg_iters.

    candidate_pool > 0 restricts OMP to the candidate_pool x budget keys of highest RMS attention (0 = every key).
    """

    name: ClassVar[str] = "am-omp"
    weight_bounds: tuple[float, float] = (1e-12, math.exp(7.0))
    pg_iters: int = 0
    mass_prior_ridge: float = 0.01  # OMP's keys are chosen to match the mass: a weaker pull (best held-out on SmolLM2)
    keys_per_step: int = 4
    refit_every: int = 2
    drop_log_weight: float = -7.0
    drop_rounds: int = 3
    candidate_pool: float = 0.0
    # OMP starts from this fraction of the budget taken by highest attention, then adds keys greedily on the mass
    # residual: from scratch it picks keys that fit the fit queries' mass but generalise worse (SmolLM2, held out:
    # 10x mass error 0.091 from scratch vs 0.057 seeded at 0.75, against am-highest-attention's 0.061).
    seed_fraction: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keys_per_step < 1 or self.refit_every < 1 or self.drop_rounds < 0:
            raise ValueError("keys_per_step and refit_every must be >= 1, drop_rounds >= 0")
        if self.candidate_pool != 0 and self.candidate_pool < 1:
            raise ValueError(f"candidate_pool must be 0 (all keys) or >= 1, got {self.candidate_pool}")
        if not 0.0 <= self.seed_fraction < 1.0:
            raise ValueError(f"seed_fraction must be in [0, 1), got {self.seed_fraction}")

    def score_request(self, rows: QueryRows) -> ScoreRequest | None:
        return ScoreRequest("rms", rows.fit) if self.candidate_pool or self.seed_fraction else None

    def select_keys(
        self, batch: HeadBatch, visibility: Visibility, reference: ReferenceAttention, rows: QueryRows
    ) -> Tensor:
        if self.candidate_pool:
            # OMP only among the candidate_pool x budget keys of highest attention: greedy mass matching over
            # every key overfits the fit queries (measured on SmolLM2); the pool keeps it to keys that matter.
            budget = batch.budget_per_head()
            pool_size = torch.minimum(torch.ceil(budget.double() * self.candidate_pool).long(), batch.key_lengths())
            pool = top_budget(reference.key_scores, visibility.key_valid, pool_size)
            in_pool = mark_keys(pool, pool >= 0, visibility.key_valid.shape[1])
            visibility = Visibility(visibility.query_valid, visibility.key_valid & in_pool, visibility.query_pos,
                                    visibility.key_pos)
        settings = OmpSettings(
            keys_per_step=self.keys_per_step,
            refit_every=self.refit_every,
            drop_log_weight=self.drop_log_weight,
            drop_rounds=self.drop_rounds,
            bounds=self.weight_bounds,
            ridge=self.mass_ridge,
        )
        seed = None
        if self.seed_fraction:
            # Start from the highest-attention keys and let OMP add the keys that repair the mass residual.
            seed_size = torch.floor(batch.budget_per_head().double() * self.seed_fraction).long()
            seed = top_budget(reference.key_scores, visibility.key_valid, seed_size.clamp(min=1))
            in_seed = torch.arange(seed.shape[1], device=seed.device)[None, :] < seed_size[:, None]
            seed = torch.where(in_seed, seed, -1)
        return omp_select(batch, visibility, reference, rows.fit, settings, seed)


# Solvers first (the default leads), then eviction, then `none`: the order users see in messages and --help.
METHODS: tuple[str, ...] = tuple(sorted(_REGISTRY, key=lambda n: (not _REGISTRY[n].fits, not _REGISTRY[n].compacts)))


def method_class(name: str) -> type[CompactionMethod]:
    """The class registered under `name` (its capabilities are class attributes)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown compaction method {name!r}; known: {', '.join(METHODS)}")
    return _REGISTRY[name]


def get_method(name: str, **options: object) -> CompactionMethod:
    """The method registered under `name`, configured with `options` (its dataclass fields)."""
    cls = method_class(name)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; options: {sorted(known)}")
    return cls(**options)


def compact_heads(batch: HeadBatch, method: str = "am-highest-attention", **options: object) -> CompactedHeads:
    """Compact every head of `batch` (all layers, one batched call) with the named method."""
    return get_method(method, **options).compact(batch)


def method_options(name: str) -> dict[str, object]:
    """Option names of a method and their defaults."""
    cls = get_method(name)
    return {f.name: getattr(cls, f.name) for f in fields(cls)}  # type: ignore[arg-type]
