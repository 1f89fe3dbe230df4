"""The one spec parser (benchmarks/specs.py) and the one results writer (benchmarks/results.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from vllm_compact.benchmarks.results import MachinePaths, ResultsFile, command_line
from vllm_compact.benchmarks.specs import SpecError, parse_option, parse_options, parse_spec


def test_specs_type_options_by_the_methods_defaults():
    spec = parse_spec("am-highest-attention:20:refit_values=1:follow_tokens=8:weight_bounds=0.5/2:ridge_grid=")
    assert (spec.method, spec.ratio) == ("am-highest-attention", 20.0)
    assert spec.options == {"refit_values": True, "follow_tokens": 8, "weight_bounds": (0.5, 2.0), "ridge_grid": ()}
    assert parse_spec("snapkv", ratio_required=False).ratio is None
    assert parse_spec("snapkv:follow_tokens=16", ratio_required=False).options == {"follow_tokens": 16}
    assert parse_spec("snapkv:3:protect", flags=("protect",)).flags == {"protect"}
    assert parse_spec("am-omp:10:queries=after+repeat", extra_keys=("queries",)).extras == {"queries": "after+repeat"}


@pytest.mark.parametrize("text", ["nope:10", "snapkv", "snapkv:0.5", "snapkv:ten", "snapkv:10:no_such=1",
                                  "snapkv:10:follow_tokens=x", "am-highest-attention:10:refit_values=maybe",
                                  "snapkv:10:protect"])
def test_bad_specs_are_refused_by_name(text):
    with pytest.raises(SpecError):
        parse_spec(text)


def test_untyped_options_are_json_or_strings():
    assert parse_options(["refit_values=false", "ridge_grid=[1, 2]", "distinct_metric=cosine"]) == {
        "refit_values": False, "ridge_grid": [1, 2], "distinct_metric": "cosine"}
    assert parse_option("follow_tokens=4", "snapkv") == ("follow_tokens", 4)
    with pytest.raises(SpecError):
        parse_option("novalue")


def test_machine_paths_become_relative_home_or_tmpdir():
    paths = MachinePaths((("/srv/repo/.venv", "$VENV"), ("/srv/repo", "."), ("/home/me", "~"), ("/tmp", "$TMPDIR")))
    text = "/srv/repo/bench/x.json /srv/repo /srv/repository /home/me/.cache/m /tmp/run/a /srv/repo/.venv/lib"
    assert paths.scrub(text) == "bench/x.json . /srv/repository ~/.cache/m $TMPDIR/run/a $VENV/lib"


def test_results_file_writes_json_and_markdown_without_machine_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = ResultsFile(tmp_path / "out" / "run.json")
    where = str(Path(tempfile.gettempdir()) / "scratch.log")
    results.write({"command": command_line("vllm-compact", "bench", "am", "--out", str(tmp_path / "x.json")),
                   "log": where}, f"# run\n\nlog at {where}\n")
    written = json.loads((tmp_path / "out" / "run.json").read_text())
    assert written["command"] == "vllm-compact bench am --out x.json"
    assert written["log"] == "$TMPDIR/scratch.log"
    assert (tmp_path / "out" / "run.md").read_text() == "# run\n\nlog at $TMPDIR/scratch.log\n"
    with pytest.raises(ValueError):
        results.write({"rows": []}, "")
