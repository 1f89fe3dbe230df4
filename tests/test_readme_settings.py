"""The README's settings table is the one generated from CompactionConfig (docs/gen_settings_table.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = "regenerate it: .venv/bin/python docs/gen_settings_table.py --write"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_settings_table", ROOT / "docs" / "gen_settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_is_the_generated_one():
    gen = _generator()
    found = gen.readme_block((ROOT / "README.md").read_text())
    assert found is not None, f"README.md has no settings table between {gen.BEGIN!r} and {gen.END!r}"
    assert found == gen.block(), f"README.md's settings table differs from CompactionConfig; {FIX}"


def test_every_setting_has_a_row_flag_and_description():
    gen = _generator()
    from vllm_compact.config import CompactionConfig

    rows = gen.table().splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ").strip("`") for row in rows] == list(CompactionConfig.model_fields)
    for field in CompactionConfig.model_fields:
        assert gen.description(field), f"CompactionConfig.{field} has no description"
        assert "--kv-compaction" in gen.flag(field) or "kv-compaction-" in gen.flag(field), field


def test_benchmark_citations_stay_out_of_the_table():
    gen = _generator()
    cleaned = gen._BENCH_CITATION.sub("", "Keeps facts (bench needle-serving, 20x: 32/40 at 0.25). Rest.")
    assert cleaned == "Keeps facts. Rest."
    assert "(bench" not in gen.table()
