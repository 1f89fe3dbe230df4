"""Pages, entries and mean objectives of a table at the budgets the engine's HeadBudgetPolicy gives."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_compact.calibration.allocation import interpolated_error


def _policy(num_layers: int, num_heads: int, table: list[list[float]] | None, ratio: float):
    """The engine's HeadBudgetPolicy for `table` (None: uniform); it reads tables from files, so write one."""
    import tempfile

    from vllm_compact.core.budgets import HeadBudgetPolicy

    path = None
    if table is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"proportions": table}, f)
            path = f.name
    try:
        return HeadBudgetPolicy(num_layers, num_heads, ratio, table_path=path)
    finally:
        if path:
            Path(path).unlink()


def memory_report(table: list[list[float]] | None, span: int, ratio: float, block_size: int) -> dict:
    """Per-layer entry totals, pages (the fullest layer decides) and physical tokens of one compacted span."""
    num_layers, num_heads = (len(table), len(table[0])) if table else (None, None)
    policy = _policy(num_layers, num_heads, table, ratio)
    budgets = policy.budgets(span, span, None)
    pages = policy.pages_needed(budgets, block_size)
    totals = [sum(row) for row in budgets]
    return {
        "span_tokens": span,
        "ratio": ratio,
        "block_size": block_size,
        "layer_totals": totals,
        "entries": sum(totals),
        "pages": pages,
        "physical_tokens": pages * block_size,  # per layer and KV head lane, like an uncompacted page's tokens
        "effective_ratio": span / (pages * block_size),
        "min_head": min(min(row) for row in budgets),
        "max_head": max(max(row) for row in budgets),
    }


def mean_coverage(curves, table: list[list[float]] | None, ratio: float) -> float:
    """Mean over heads of coverage at the budgets the engine's HeadBudgetPolicy gives a span of T keys."""
    num_layers, num_heads, span = curves.shape
    budgets = _policy(num_layers, num_heads, table, ratio).budgets(span, span, None)
    values = [float(curves[l, h, b - 1]) for l, row in enumerate(budgets) for h, b in enumerate(row)]
    return sum(values) / len(values)


def mean_error(errors, grid: list[int], span: int, table: list[list[float]] | None, ratio: float) -> float:
    """Mean over heads of the interpolated held-out output error at the engine's budgets (uniform or table)."""
    num_layers, num_heads, _ = errors.shape
    budgets = _policy(num_layers, num_heads, table, ratio).budgets(span, span, None)
    rows = errors.double().tolist()
    values = [interpolated_error(rows[l][h], grid, b) for l, row in enumerate(budgets) for h, b in enumerate(row)]
    return sum(values) / len(values)


def compare_memory(table: list[list[float]], span: int, ratio: float, block_size: int) -> dict:
    uniform = [[1.0] * len(table[0]) for _ in table]
    return {"uniform": memory_report(uniform, span, ratio, block_size),
            "calibrated": memory_report(table, span, ratio, block_size)}
