"""Per-(layer, KV head) budgets of a compact segment, and the pages they occupy in the packed layout."""

from __future__ import annotations

import torch

from vllm_compact.core.compact_pages import pages_for
from vllm_compact.head_table import UNIFORM, check_table_shape, read_head_table

Budgets = tuple[tuple[int, ...], ...]  # [num_layers][num_kv_heads]
_MEMO_ENTRIES = 4096  # distinct budget requests remembered (a few hundred bytes each)


def load_head_table(path: str, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """A JSON file {"proportions": [[p per KV head] per layer]} (any positive scale; normalised here)."""
    rows = read_head_table(path)  # HeadTableError (a ValueError) names what is wrong
    check_table_shape(path, rows, num_layers, num_kv_heads)
    table = torch.tensor(rows, dtype=torch.float64)
    return table / table.sum()


class HeadBudgetPolicy:
    """Turns a span length and the target ratio into per-head entry counts (uniform, or a per-head table).

    A table whose layer rows all have the same sum (what `vllm-compact calibrate` writes by default) moves budget
    only among the heads of a layer: it is distributed layer by layer, so every layer holds the uniform total and
    the segment takes exactly uniform's pages. Any other table is distributed over all heads at once; its fullest
    layer then decides the pages of every layer (pages_needed).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, ratio: float, table_path: str | None = None) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.ratio = ratio
        use_table = table_path is not None and table_path != UNIFORM
        self.table = load_head_table(table_path, num_layers, num_kv_heads) if use_table else None
        rows = self.table.sum(1) if self.table is not None else None
        self.per_layer = rows is not None and bool(torch.allclose(rows, rows[0].expand_as(rows), rtol=1e-6, atol=0))
        self._memo: dict[tuple, Budgets] = {}

    def budgets(
        self, span_tokens: int, new_tokens: int, old_lens: Budgets | None, ratio: float | None = None
    ) -> Budgets:
        """Entries per head for a segment standing for `span_tokens` logical tokens.

        A head can keep at most the keys it is given: its old compact entries plus the new tokens. Memoised: under
        memory pressure the scheduler sizes a candidate plan for every running request at every step, and the
        same (span, new tokens, old budgets, ratio) come back step after step (spans move by whole pages).
        """
        key = (span_tokens, new_tokens, old_lens, ratio or self.ratio)
        cached = self._memo.get(key)
        if cached is None:
            if len(self._memo) >= _MEMO_ENTRIES:
                self._memo.clear()
            cached = self._memo[key] = self._budgets(span_tokens, new_tokens, old_lens, ratio)
        return cached

    def _budgets(
        self, span_tokens: int, new_tokens: int, old_lens: Budgets | None, ratio: float | None
    ) -> Budgets:
        shape = (self.num_layers, self.num_kv_heads)
        available = torch.full(shape, new_tokens, dtype=torch.int64)
        if old_lens is not None:
            available += torch.tensor(old_lens, dtype=torch.int64)
        per_head = max(1, round(span_tokens / (ratio or self.ratio)))
        if self.table is None:
            budgets = torch.full(shape, per_head, dtype=torch.int64)
        else:
            from vllm_compact.am.budgets import proportional_budgets

            if self.per_layer:
                budgets = torch.stack([
                    proportional_budgets(self.table[layer].float(), available[layer], per_head * self.num_kv_heads)
                    for layer in range(self.num_layers)
                ])
            else:
                total = per_head * self.num_layers * self.num_kv_heads
                budgets = proportional_budgets(
                    self.table.flatten().float(), available.flatten(), total
                ).view(shape)
        budgets = torch.minimum(budgets.clamp(min=1), available)
        return tuple(tuple(int(x) for x in row) for row in budgets.tolist())

    def pages_needed(self, budgets: Budgets, block_size: int) -> int:
        """Heads of a layer are packed back to back; the fullest layer decides the page count."""
        return pages_for([sum(layer) for layer in budgets], lanes=block_size * self.num_kv_heads)
