"""Per-head budgets: uniform ratio, or a calibrated proportion table water-filled under a per-head cap."""

from __future__ import annotations

import torch
from torch import Tensor

_BISECTION_STEPS = 200
_ZERO_SHARE_FLOOR = 1e-12


def uniform_budgets(key_len: Tensor, ratio: float) -> Tensor:
    """[H] int64 max(1, round(key_len / ratio))."""
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    return torch.round(key_len.double() / ratio).long().clamp(min=1)


def proportional_budgets(proportions: Tensor, key_len: Tensor, total: int, cap_fraction: float = 0.75) -> Tensor:
    """[H] int64 budgets ~ p_h * total, each in [1, cap_h] with cap_h = max(1, floor(cap_fraction * key_len_h)).

    What a capped head cannot take is water-filled to the others in proportion to p (to heads with p = 0 only
    once all others are capped). The budgets sum to `total` when that is feasible (H <= total <= sum of caps);
    otherwise every head sits at its nearest bound.
    """
    if proportions.shape != key_len.shape or proportions.dim() != 1:
        raise ValueError("proportions and key_len must both be [H]")
    p = proportions.double().clamp(min=0.0)
    p = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1.0 / p.numel())
    # A vanishing floor: heads with p = 0 take budget only once every other head is capped.
    p = p + _ZERO_SHARE_FLOOR / p.numel()
    cap = torch.floor(key_len.double() * cap_fraction).clamp(min=1.0)
    share = _water_fill(p, cap, float(total))
    return _round_preserving_sum(share, cap, total)


def _water_fill(p: Tensor, cap: Tensor, total: float) -> Tensor:
    """Continuous x_h = clamp(level * p_h, 1, cap_h) with the level chosen so that sum x = total (bisection)."""

    def filled(level: float) -> Tensor:
        return torch.minimum(torch.maximum(level * p, torch.ones_like(p)), cap)

    low, high = 0.0, 1.0
    while float(filled(high).sum()) < total and high < 1e300:
        high *= 2.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if float(filled(mid).sum()) < total:
            low = mid
        else:
            high = mid
    return filled(high)


def _round_preserving_sum(share: Tensor, cap: Tensor, total: int) -> Tensor:
    """Floor, then hand the remaining units to the largest fractional parts (never above the cap)."""
    base = torch.floor(share)
    missing = int(total - base.sum().item())
    room = base < cap
    fraction = torch.where(room, share - base, torch.full_like(share, -1.0))
    if missing > 0:
        order = fraction.argsort(descending=True)
        receivers = order[: min(missing, int(room.sum()))]
        base[receivers] += 1.0
    return base.long()
