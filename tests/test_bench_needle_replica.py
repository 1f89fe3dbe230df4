"""The replica benchmark's configuration strings map onto the methods' own options."""

from __future__ import annotations

import pytest

from vllm_compact.am.methods import get_method
from vllm_compact.benchmarks.needle_replica import parse_config


def test_configurations_parse_to_method_options() -> None:
    method, ratio, options, protect, queries = parse_config(
        "am-highest-attention:10:refit_values=0:weight_bounds=1:ridge_grid=")
    assert (method, ratio, protect, queries) == ("am-highest-attention", 10.0, False, "after")
    assert options == {"refit_values": False, "weight_bounds": (1.0, 1.0), "ridge_grid": ()}
    configured = get_method(method, **options)
    assert configured.refit_values is False and configured.weight_bounds == (1.0, 1.0)
    assert parse_config("snapkv:20:follow_tokens=16:protect") == ("snapkv", 20.0, {"follow_tokens": 16}, True, "after")
    assert parse_config("am-omp:10:queries=after+context")[4] == "after+context"


def test_a_configuration_needs_a_ratio() -> None:
    with pytest.raises(ValueError):
        parse_config("snapkv")
