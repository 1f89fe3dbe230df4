"""`vllm-compact bench`: only the benchmarks a user runs, each importable with a main(argv)."""

from __future__ import annotations

import importlib

from vllm_compact.server import bench

USER_FACING = {"needle-serving", "serving", "am", "reliability"}


def test_help_lists_the_user_facing_benchmarks_only(capsys):
    assert bench.main(["--help"]) == 0
    printed = capsys.readouterr().out
    listed = {line.split()[0] for line in printed.splitlines()[2:] if line.startswith("  ")}
    assert listed == USER_FACING
    for gone in ("needle-replica", "needle-kept", "needle-diagnosis", "needle-sources", "bench throughput",
                 "head-budgets"):
        assert gone not in printed


def test_an_unknown_benchmark_exits_2_with_the_list(capsys):
    assert bench.main(["needle-replica"]) == 2
    assert "needle-serving" in capsys.readouterr().err


def test_every_benchmark_module_has_a_main():
    for module, _ in bench.BENCHMARKS.values():
        assert callable(importlib.import_module(module).main)
