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


# ---- the tables shipped with the package, and which table a served model gets ---------------------------------------

TABLES_DIR = Path(__file__).resolve().parent / "head_tables"  # <registry name>.json, written by `vllm-compact calibrate`
UNIFORM = "uniform"  # head_budget_file value that forces uniform budgets (no shipped table either)
# config.json fields that identify a model's shape (a fine-tune of the same base shares them)
FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                    "head_dim", "intermediate_size", "vocab_size")


def read_model_config(model_dir: str | Path | None) -> dict | None:
    if model_dir is None:
        return None
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def model_fingerprint(config: dict) -> dict:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    out = {key: text.get(key) for key in FINGERPRINT_KEYS}
    if out["head_dim"] is None and isinstance(out["hidden_size"], int) and isinstance(out["num_attention_heads"], int):
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def shipped_tables() -> dict[str, Path]:
    """Registry name -> the table shipped for it."""
    return {path.stem: path for path in sorted(TABLES_DIR.glob("*.json"))}


def shipped_table_for(model: str | None, model_config: dict | None = None) -> tuple[str, Path] | None:
    """(name, path) of the shipped table for a model given by its registry name, or whose config (config.json as
    a dict; read from `model` when it is a folder and none is given) has the fingerprint a shipped table records."""
    tables = shipped_tables()
    if model in tables:
        return model, tables[model]
    if model_config is None and model is not None:
        model_config = read_model_config(model)
    if not model_config:
        return None
    fingerprint = model_fingerprint(model_config)
    for name, path in tables.items():
        try:
            recorded = json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError):
            continue
        if recorded == fingerprint:
            return name, path
    return None


def resolve_head_budgets(head_budget_file: str | None, model: str | None,
                         model_config: dict | None = None) -> tuple[str | None, str]:
    """(the table file to use or None for uniform, a sentence saying which and why).

    An explicit file wins; "uniform" forces uniform budgets; unset takes the table shipped for the model (by
    registry name or config fingerprint) and uniform budgets when there is none."""
    if head_budget_file == UNIFORM:
        return None, "uniform (forced by head_budget_file='uniform')"
    if head_budget_file is not None:
        return head_budget_file, describe_head_budgets(head_budget_file)
    found = shipped_table_for(model, model_config)
    if found is None:
        return None, "uniform (no table shipped for this model; head_budget_file unset)"
    name, path = found
    return str(path), f"calibrated table shipped for {name} ({path})"


def describe_head_budgets(head_budget_file: str | None) -> str:
    """What a resolved head_budget_file value means, in words (the config endpoint, the engine log)."""
    if head_budget_file is None:
        return "uniform (no table for this model)"
    if head_budget_file == UNIFORM:
        return "uniform (forced by head_budget_file='uniform')"
    path = Path(head_budget_file).resolve()
    if path.parent == TABLES_DIR:
        return f"calibrated table shipped for {path.stem} ({path})"
    return f"table from head_budget_file {head_budget_file!r}"
