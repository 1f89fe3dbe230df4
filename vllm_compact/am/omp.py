"""Key selection by orthogonal matching pursuit on the attention mass, batched over heads.

Phi = exp(s Q K^T + bias - rowmax) over the fit queries, m = Phi 1. Each step adds the `keys_per_step` keys most
correlated with the residual r = m - Phi[:, S] w (a head at its budget adds nothing), w >= 0 is refitted every
`refit_every` steps; once full, keys with log w below `drop_log_weight` are dropped, excluded and refilled (at most
`drop_rounds` rounds). The caller then solves the final NNLS on the chosen keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_compact.am.attention import NEG_INF, ReferenceAttention, Visibility
from vllm_compact.am.selection import mark_keys, sorted_with_padding
from vllm_compact.am.types import HeadBatch
from vllm_compact.kernels import nnls_pg

_WORST_CORRELATION = -3.0e38  # stands in for NaN correlations: still a candidate, ranked last


@dataclass
class OmpSettings:
    keys_per_step: int
    refit_every: int
    drop_log_weight: float
    drop_rounds: int
    bounds: tuple[float, float]
    ridge: float  # relative ridge of the refits' least-squares start


def mass_atoms(batch: HeadBatch, visibility: Visibility, reference: ReferenceAttention, fit_rows: Tensor) -> Tensor:
    """Phi^T [H,T,N] fp32: exp(s q.k + bias - rowmax), zero outside the fit rows and invisible pairs."""
    logits = torch.bmm(batch.keys.float(), batch.queries.float().transpose(1, 2))
    logits.mul_(batch.scale_per_head()[:, None, None])
    if batch.key_bias is not None:
        logits.add_(batch.bias_or_zero()[:, :, None])
    every = slice(None)
    visible = visibility.tile(every, every)
    hidden = ~fit_rows[:, None, :] if visible is None else ~visible.transpose(1, 2) | ~fit_rows[:, None, :]
    logits.masked_fill_(hidden, NEG_INF)
    stabiliser = torch.where(torch.isfinite(reference.row_max), reference.row_max, 0.0)
    return logits.sub_(stabiliser[:, None, :]).exp_()


class BatchedOmp:
    """Greedy state of every head: chosen slots, excluded keys, current weights and residual."""

    def __init__(self, atoms: Tensor, key_valid: Tensor, budget: Tensor, fit_rows: Tensor, settings: OmpSettings):
        heads, n_keys, _ = atoms.shape
        device = atoms.device
        self.atoms = atoms  # Phi^T [H,T,N]
        self.target = atoms.sum(dim=1)  # m = Phi 1 [H,N]
        self.key_valid = key_valid
        self.budget = budget
        self.fit_rows = fit_rows
        self.settings = settings
        self.tmax = int(budget.max())
        self.chosen = torch.zeros(heads, self.tmax + 1, dtype=torch.int64, device=device)  # last column: scratch
        self.size = torch.zeros(heads, dtype=torch.int64, device=device)
        self.taken = torch.zeros(heads, n_keys, dtype=torch.bool, device=device)
        self.excluded = torch.zeros_like(self.taken)
        self.residual = self.target.clone()
        self.weight = torch.zeros(heads, self.tmax, device=device)

    def slot_valid(self) -> Tensor:
        return torch.arange(self.tmax, device=self.size.device)[None, :] < self.size[:, None]

    def candidates(self) -> Tensor:
        return self.key_valid & ~self.taken & ~self.excluded

    def seed(self, keys: Tensor) -> None:
        """Start from given keys: [H, k] indices, -1 padded (each head's count must be within its budget)."""
        valid = keys >= 0
        count = valid.sum(dim=1)
        slots = torch.where(valid, torch.arange(keys.shape[1], device=keys.device)[None, :], self.tmax)
        self.chosen.scatter_(1, slots, keys.clamp(min=0))
        self.taken |= mark_keys(keys, valid, self.taken.shape[1])
        self.size = count
        self.refit()

    def add_keys(self) -> None:
        """Append the keys most correlated with the residual, up to each head's remaining budget."""
        step = min(self.settings.keys_per_step, self.atoms.shape[1])
        quota = (self.budget - self.size).clamp(min=0, max=step)
        correlation = torch.bmm(self.atoms, self.residual[:, :, None])[:, :, 0]
        correlation = torch.nan_to_num(correlation, nan=_WORST_CORRELATION, neginf=_WORST_CORRELATION)
        correlation = correlation.masked_fill(~self.candidates(), NEG_INF)
        best = correlation.topk(step, dim=1).indices
        offsets = torch.arange(step, device=best.device)[None, :]
        take = offsets < quota[:, None]
        slots = torch.where(take, self.size[:, None] + offsets, self.tmax)
        self.chosen.scatter_(1, slots, best)
        self.taken |= torch.zeros_like(self.taken).scatter_(1, best, take)
        self.size += quota

    def refit(self) -> None:
        """w = NNLS on the chosen columns (no gradient steps), residual r = m - Phi[:, S] w."""
        columns = torch.gather(self.atoms, 1, self.chosen[:, : self.tmax, None].expand(-1, -1, self.atoms.shape[2]))
        valid = self.slot_valid()
        low, high = self.settings.bounds
        self.weight = nnls_pg(
            columns.transpose(1, 2), self.target, lower=low, upper=high, col_mask=valid, row_mask=self.fit_rows,
            pg_iters=0, ridge=self.settings.ridge,
        )
        fitted = torch.bmm(self.weight[:, None, :], columns)[:, 0, :]
        self.residual = self.target - fitted

    def fill(self) -> None:
        """Add keys until every head holds its budget; the weights are current on return."""
        steps = 0
        while bool((self.size < self.budget).any()):
            self.add_keys()
            steps += 1
            if steps % self.settings.refit_every == 0:
                self.refit()
        if steps % self.settings.refit_every != 0:
            self.refit()

    def drop_dead(self) -> bool:
        """Drop (and exclude for good) keys with log w below the threshold, as many as can be refilled."""
        valid = self.slot_valid()
        log_weight = torch.log(self.weight.clamp(min=torch.finfo(torch.float32).tiny))
        dead = valid & (log_weight < self.settings.drop_log_weight)
        n_drop = torch.minimum(dead.sum(dim=1), self.candidates().sum(dim=1))
        if not bool((n_drop > 0).any()):
            return False
        order = self.weight.masked_fill(~dead, float("inf")).argsort(dim=1).argsort(dim=1)
        drop = dead & (order < n_drop[:, None])
        slots = self.chosen[:, : self.tmax]
        dropped_keys = mark_keys(slots, drop, self.taken.shape[1])
        self.excluded |= dropped_keys
        self.taken &= ~dropped_keys
        keep_first = (~(valid & ~drop)).to(torch.int8).argsort(dim=1, stable=True)
        self.chosen[:, : self.tmax] = torch.gather(slots, 1, keep_first)
        self.size -= n_drop
        return True

    def chosen_indices(self) -> Tensor:
        """[H,tmax] chosen keys ascending, -1 padded."""
        return sorted_with_padding(torch.where(self.slot_valid(), self.chosen[:, : self.tmax], -1))


def omp_select(
    batch: HeadBatch, visibility: Visibility, reference: ReferenceAttention, fit_rows: Tensor, settings: OmpSettings,
    seed: Tensor | None = None,
) -> Tensor:
    """[H, max budget] keys chosen by batched OMP on the mass of the fit queries (from `seed` keys if given)."""
    atoms = mass_atoms(batch, visibility, reference, fit_rows)
    omp = BatchedOmp(atoms, visibility.key_valid, batch.budget.to(atoms.device), fit_rows, settings)
    if seed is not None:
        omp.seed(seed.to(atoms.device))
    omp.fill()
    for _ in range(settings.drop_rounds):
        if not omp.drop_dead():
            break
        omp.refit()
        omp.fill()
    return omp.chosen_indices()
