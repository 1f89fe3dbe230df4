"""Per-head budget allocations from measured curves (greedy on coverage, exchange on error) and their proportions."""

from __future__ import annotations

import math


def greedy_allocation(curves, total: int, floor_units: int, cap: int) -> list[int]:
    """Entries per head for `total` entries over the heads of `curves` ([G, T] coverage, curves[g, k-1] = coverage
    with k keys): every head starts at floor_units, each further entry goes to the head whose coverage gains the
    most from it (ties: the lower head index), no head above `cap`. Optimal for concave curves."""
    import heapq

    rows = [[0.0, *map(float, row)] for row in curves.double().tolist()]  # rows[g][k] = coverage with k keys
    heads = len(rows)
    cap = max(1, min(cap, len(rows[0]) - 1))
    start = min(max(1, floor_units), cap)
    alloc = [start] * heads
    left = total - start * heads
    heap = [(-(row[start + 1] - row[start]), g) for g, row in enumerate(rows) if start < cap]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, g = heapq.heappop(heap)
        alloc[g] += 1
        left -= 1
        k = alloc[g]
        if k < cap:
            heapq.heappush(heap, (-(rows[g][k + 1] - rows[g][k]), g))
    return alloc


def _averaged_shares(rows, span: int, ratios: list[float], floor: float, scope: str, allocate):
    """[L, H] float64 proportions summing to 1: `allocate(head_rows, per_head, floor_units, cap)` (integer entries
    per head of `head_rows` [n, ...], n heads sharing n x per_head) at each ratio, per layer for scope 'layer' or
    over all heads for 'model', as a share of its total, averaged over ratios. Scope 'layer' gives every row 1 / L."""
    import torch

    num_layers, num_heads = rows.shape[:2]
    cap = max(1, math.floor(0.75 * span))
    out = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    for ratio in ratios:
        per_head = max(1, round(span / ratio))
        floor_units = max(1, math.floor(floor * per_head))
        if scope == "layer":
            for layer in range(num_layers):
                alloc = torch.tensor(allocate(rows[layer], per_head, floor_units, cap), dtype=torch.float64)
                out[layer] += alloc / alloc.sum() / num_layers
        elif scope == "model":
            alloc = torch.tensor(allocate(rows.flatten(0, 1), per_head, floor_units, cap), dtype=torch.float64)
            out += (alloc / alloc.sum()).view(num_layers, num_heads)
        else:
            raise ValueError(f"scope must be 'layer' or 'model', got {scope!r}")
    return out / len(ratios)


def proportions_from_curves(curves, ratios: list[float], floor: float, scope: str):
    """[L, H] proportions from [L, H, T] coverage curves: the greedy allocation at each ratio."""
    def allocate(heads, per_head, floor_units, cap):
        return greedy_allocation(heads, per_head * heads.shape[0], floor_units, cap)

    return _averaged_shares(curves, curves.shape[2], ratios, floor, scope, allocate)


def interpolated_error(errors_h: list[float], budgets: list[int], b: float) -> float:
    """A head's error at budget b: linear in log(budget) between the grid points, the first segment's slope
    below the grid (fewer keys keep costing), flat above it (no gain claimed where nothing was measured)."""
    if len(budgets) == 1:
        return errors_h[0]
    x = math.log(max(b, 1e-9))
    xs = [math.log(v) for v in budgets]
    if x >= xs[-1]:
        return errors_h[-1]
    i = 0 if x <= xs[0] else max(j for j in range(len(xs) - 1) if xs[j] <= x)
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return errors_h[i] + t * (errors_h[i + 1] - errors_h[i])


def exchange_allocation(errors, budgets: list[int], uniform: int, floor_units: int, cap: int,
                        step: int | None = None, max_moves: int = 100_000) -> list[int]:
    """The paper's greedy exchange on [G, B] error curves at grid `budgets`: start every head at `uniform`, move
    `step` entries (default uniform / 8) from the donor that loses least to the recipient that gains most while
    that lowers the summed error; no head below floor_units or above cap. The total stays G x uniform."""
    rows = errors.double().tolist()
    heads = len(rows)
    step = step or max(1, uniform // 8)
    alloc = [uniform] * heads

    def err(h: int, b: int) -> float:
        return interpolated_error(rows[h], budgets, b)

    for _ in range(max_moves):
        gains = [(err(h, alloc[h]) - err(h, alloc[h] + step), h) for h in range(heads) if alloc[h] + step <= cap]
        costs = [(err(h, alloc[h] - step) - err(h, alloc[h]), h) for h in range(heads)
                 if alloc[h] - step >= floor_units]
        best = None
        for gain, r in gains:
            for cost, d in costs:
                if d != r and gain - cost > 1e-12 and (best is None or gain - cost > best[0]):
                    best = (gain - cost, r, d)
        if best is None:
            break
        _, r, d = best
        alloc[r] += step
        alloc[d] -= step
    return alloc


def proportions_from_errors(errors, budgets: list[int], span: int, ratios: list[float], floor: float, scope: str):
    """[L, H] proportions from [L, H, B] error curves: the exchange from uniform at each ratio."""
    def allocate(heads, per_head, floor_units, cap):
        return exchange_allocation(heads, budgets, per_head, floor_units, cap)

    return _averaged_shares(errors, span, ratios, floor, scope, allocate)
