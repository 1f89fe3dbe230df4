"""Per-request compaction keys in vllm_xargs: parsing, server narrowing, error messages."""

from __future__ import annotations

import pytest

from vllm_compact.config import CompactionConfig
from vllm_compact.engine.request_overrides import METHODS, RequestOverrideError, request_config, request_overrides

SERVER = CompactionConfig(enabled=True, ratio=8.0, method="am-highest-attention")


def test_no_keys_means_no_overrides():
    assert request_overrides(None) == {}
    assert request_overrides({}) == {}
    assert request_overrides({"kv_transfer_params": {"x": 1}, "other_ext": "v"}) == {}
    assert request_config(SERVER, {"other_ext": 3}) is SERVER


@pytest.mark.parametrize(
    "value, expected",
    [(False, False), (True, True), (0, False), (1, True), ("false", False), ("TRUE", True), ("0", False), ("on", True)],
)
def test_enabled_accepts_booleans_and_the_0_1_that_vllm_xargs_makes_of_them(value, expected):
    assert request_overrides({"kv_compaction_enabled": value}) == {"enabled": expected}


def test_ratio_and_method_are_parsed():
    got = request_overrides({"kv_compaction_ratio": "16", "kv_compaction_method": "am-omp"})
    assert got == {"ratio": 16.0, "method": "am-omp"}
    assert request_overrides({"kv_compaction_ratio": 12})["ratio"] == 12.0


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"kv_compaction_enabled": 2}, ["kv_compaction_enabled=2", "true, false, 0 or 1"]),
        ({"kv_compaction_enabled": "maybe"}, ["kv_compaction_enabled='maybe'", "allowed"]),
        ({"kv_compaction_ratio": "ten"}, ["kv_compaction_ratio='ten'", "number >= 1"]),
        ({"kv_compaction_ratio": [2]}, ["kv_compaction_ratio=[2]"]),
        ({"kv_compaction_ratio": "nan"}, ["kv_compaction_ratio='nan'"]),
        ({"kv_compaction_ratio": True}, ["kv_compaction_ratio=True"]),
        ({"kv_compaction_method": "magic"}, ["kv_compaction_method='magic'", *METHODS]),
        ({"kv_compaction_ratoi": 3}, ["unknown", "kv_compaction_ratoi", "kv_compaction_ratio"]),
        ({"kv_compaction": '{"enabled": false}'}, ["unknown", "'kv_compaction'", "kv_compaction_enabled"]),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(extra, fragments):
    with pytest.raises(ValueError) as info:
        request_overrides(extra)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_request_may_turn_compaction_off_whatever_else_it_says():
    cfg = request_config(SERVER, {"kv_compaction_enabled": 0, "kv_compaction_ratio": 2})
    assert cfg.enabled is False
    assert SERVER.enabled is True  # the server's config is never mutated


def test_request_may_be_stricter_or_use_another_method():
    cfg = request_config(SERVER, {"kv_compaction_ratio": 20, "kv_compaction_method": "snapkv"})
    assert (cfg.enabled, cfg.ratio, cfg.method) == (True, 20.0, "snapkv")
    assert cfg.trigger_tokens == SERVER.trigger_tokens


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"kv_compaction_ratio": 4}, ["kv_compaction_ratio=4.0", "looser", ">= 8.0"]),
        ({"kv_compaction_ratio": 5000}, ["kv_compaction_ratio=5000.0", "less than or equal to 1000"]),
        ({"kv_compaction_ratio": 0.5}, ["kv_compaction_ratio=0.5", "looser"]),
    ],
)
def test_request_cannot_loosen_the_server(extra, fragments):
    with pytest.raises(RequestOverrideError) as info:
        request_config(SERVER, extra)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.key == "kv_compaction_ratio"  # becomes the `param` of the HTTP 400


def test_request_cannot_enable_compaction_on_a_server_without_it():
    off = CompactionConfig(enabled=False)
    with pytest.raises(RequestOverrideError, match="disabled on this server") as info:
        request_config(off, {"kv_compaction_enabled": 1})
    assert info.value.key == "kv_compaction_enabled"
