"""The per-head budget file (`--kv-compaction-head-budgets FILE`): reading and checking it, in plain Python.

The file is `{"proportions": [[p per KV head] per layer]}` with finite numbers >= 0 and a positive sum (any scale;
the engine normalises it). No torch and no vLLM here: the server checks the file before vLLM is imported, and its
shape against the model's config.json before the model loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FORMAT = '{"proportions": [[p per KV head] per layer]} of numbers >= 0 with a positive sum'


class HeadTableError(ValueError):
    pass


def read_head_table(path: str | Path) -> list[list[float]]:
    """The table's rows, or HeadTableError saying what is wrong with the file (bad JSON, shape, values)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise HeadTableError(f"head_budget_file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or nesting too deep for json
        raise HeadTableError(f"head_budget_file {str(path)!r} is not valid JSON: {e}") from None
    where = f"head_budget_file {str(path)!r}"
    if not isinstance(data, dict) or "proportions" not in data:
        raise HeadTableError(f"{where} must be a JSON object with a \"proportions\" key: {FORMAT}")
    rows = data["proportions"]
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) and row for row in rows):
        raise HeadTableError(f"{where}: \"proportions\" must be a non-empty list of non-empty lists: {FORMAT}")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise HeadTableError(f"{where}: the layers' rows have different lengths {sorted(widths)}: {FORMAT}")
    for layer, row in enumerate(rows):
        for head, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HeadTableError(f"{where}: proportions[{layer}][{head}]={value!r} is not a number: {FORMAT}")
            if not math.isfinite(value) or value < 0:
                raise HeadTableError(f"{where}: proportions[{layer}][{head}]={value!r} is not a finite number >= 0")
    table = [[float(v) for v in row] for row in rows]
    if sum(map(sum, table)) <= 0:
        raise HeadTableError(f"{where}: the proportions sum to 0; at least one head needs a positive share")
    return table


def table_shape(table: list[list[float]]) -> tuple[int, int]:
    return len(table), len(table[0])


def check_table_shape(path: str | Path, table: list[list[float]], num_layers: int, num_kv_heads: int) -> None:
    if table_shape(table) != (num_layers, num_kv_heads):
        raise HeadTableError(
            f"head_budget_file {str(path)!r} has {len(table)} layers x {len(table[0])} KV heads; the model has "
            f"{num_layers} layers x {num_kv_heads} KV heads"
        )


def model_head_shape(model_dir: str | Path) -> tuple[int, int] | None:
    """(layers, KV heads) from a model folder's config.json; None if there is none or it does not say."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = text.get("num_hidden_layers")
    heads = text.get("num_key_value_heads", text.get("num_attention_heads"))
    if not isinstance(layers, int) or not isinstance(heads, int) or layers <= 0 or heads <= 0:
        return None
    return layers, heads
