"""Per-request compaction keys in vllm_xargs: parsing, server narrowing, error messages and the field they name."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_compact.config import MAX_RATIO, CompactionConfig
from vllm_compact.core.request_overrides import (
    KEYS,
    METHODS,
    RequestOverrideError,
    is_compaction_key,
    request_config,
    request_overrides,
)

SERVER = CompactionConfig(enabled=True, ratio=8.0, method="am-highest-attention")


def test_no_keys_means_no_overrides():
    assert request_overrides(None) == {}
    assert request_overrides({}) == {}
    assert request_overrides({"kv_transfer_params": {"x": 1}, "other_ext": "v", 3: "int key"}) == {}
    assert request_config(SERVER, {"other_ext": 3}) is SERVER
    assert request_config(SERVER, None) is SERVER


@pytest.mark.parametrize("value, expected", [(False, False), (True, True), (0, False), (1, True), (1.0, True)])
def test_enabled_accepts_booleans_and_the_0_1_that_vllm_xargs_makes_of_them(value, expected):
    assert request_overrides({"kv_compaction_enabled": value}) == {"enabled": expected}


def test_ratio_and_method_are_parsed():
    got = request_overrides({"kv_compaction_ratio": 16, "kv_compaction_method": "am-omp"})
    assert got == {"ratio": 16.0, "method": "am-omp"}
    assert request_overrides({"kv_compaction_ratio": 12.5})["ratio"] == 12.5
    assert request_overrides({"kv_compaction_ratio": MAX_RATIO})["ratio"] == MAX_RATIO


@pytest.mark.parametrize(
    "extra, key, fragments",
    [
        ({"kv_compaction_enabled": 2}, "kv_compaction_enabled", ["kv_compaction_enabled=2", "true, false, 0 or 1"]),
        ({"kv_compaction_enabled": "false"}, "kv_compaction_enabled", ["kv_compaction_enabled='false'", "not a boolean"]),
        ({"kv_compaction_enabled": None}, "kv_compaction_enabled", ["kv_compaction_enabled=None"]),
        ({"kv_compaction_enabled": [1]}, "kv_compaction_enabled", ["kv_compaction_enabled=[1]"]),
        ({"kv_compaction_ratio": "16"}, "kv_compaction_ratio", ["kv_compaction_ratio='16'", "a string, not a number"]),
        ({"kv_compaction_ratio": "ten"}, "kv_compaction_ratio", ["'ten'", "a number >= 1.0 and <= 1000.0"]),
        ({"kv_compaction_ratio": "inf"}, "kv_compaction_ratio", ["'inf'", "a string"]),
        ({"kv_compaction_ratio": "nan"}, "kv_compaction_ratio", ["'nan'", "a string"]),
        ({"kv_compaction_ratio": True}, "kv_compaction_ratio", ["kv_compaction_ratio=True", "a boolean, not a number"]),
        ({"kv_compaction_ratio": False}, "kv_compaction_ratio", ["a boolean"]),
        ({"kv_compaction_ratio": [20]}, "kv_compaction_ratio", ["kv_compaction_ratio=[20]", "a list"]),
        ({"kv_compaction_ratio": {"v": 20}}, "kv_compaction_ratio", ["an object"]),
        ({"kv_compaction_ratio": None}, "kv_compaction_ratio", ["null"]),
        ({"kv_compaction_ratio": math.inf}, "kv_compaction_ratio", ["=inf", "not a finite number"]),
        ({"kv_compaction_ratio": -math.inf}, "kv_compaction_ratio", ["=-inf", "not a finite number"]),
        ({"kv_compaction_ratio": math.nan}, "kv_compaction_ratio", ["=nan", "not a finite number"]),
        ({"kv_compaction_ratio": 10**400}, "kv_compaction_ratio", ["an integer of 1329 bits", "not a finite number"]),
        ({"kv_compaction_ratio": 10**5000}, "kv_compaction_ratio", ["not a finite number"]),  # repr itself would raise
        ({"kv_compaction_ratio": 1e300}, "kv_compaction_ratio", ["=1e+300", "out of range"]),
        ({"kv_compaction_ratio": 0.5}, "kv_compaction_ratio", ["=0.5", "out of range"]),
        ({"kv_compaction_method": "magic"}, "kv_compaction_method", ["kv_compaction_method='magic'", *METHODS]),
        ({"kv_compaction_method": 3}, "kv_compaction_method", ["kv_compaction_method=3"]),
        ({"kv_compaction_ratoi": 3}, "kv_compaction_ratoi", ["unknown", "'kv_compaction_ratoi'", "kv_compaction_ratio"]),
        ({"kv_compaction": '{"enabled": false}'}, "kv_compaction", ["unknown", "'kv_compaction'", "kv_compaction_enabled"]),
        ({"KV_Compaction_Ratio": 16}, "KV_Compaction_Ratio", ["unknown", "did you mean 'kv_compaction_ratio'"]),
        ({"kv-compaction-enabled": False}, "kv-compaction-enabled", ["did you mean 'kv_compaction_enabled'"]),
        ({"kvCompactionMethod": "snapkv"}, "kvCompactionMethod", ["did you mean 'kv_compaction_method'"]),
        ({"KV_COMPACTION_TRIGGER": 5}, "KV_COMPACTION_TRIGGER", ["unknown"]),  # not per-request, in any case
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(extra, key, fragments):
    with pytest.raises(RequestOverrideError) as info:
        request_config(SERVER, extra)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.key == key
    assert info.value.param == f"vllm_xargs.{key}"  # the `param` of the HTTP 400


@pytest.mark.parametrize("xargs", [[1], "kv_compaction_ratio=20", 20, True, [{"kv_compaction_ratio": 20}]])
def test_a_vllm_xargs_that_is_not_an_object_is_refused_as_a_whole(xargs):
    with pytest.raises(RequestOverrideError, match="vllm_xargs must be an object") as info:
        request_config(SERVER, xargs)
    assert info.value.key is None and info.value.param == "vllm_xargs"


def test_request_may_turn_compaction_off_whatever_else_it_says_but_values_are_still_typed():
    cfg = request_config(SERVER, {"kv_compaction_enabled": 0, "kv_compaction_ratio": 2})
    assert cfg.enabled is False
    assert SERVER.enabled is True  # the server's config is never mutated
    with pytest.raises(RequestOverrideError):
        request_config(SERVER, {"kv_compaction_enabled": False, "kv_compaction_ratio": "x"})


def test_request_may_be_stricter_or_use_another_method():
    cfg = request_config(SERVER, {"kv_compaction_ratio": 20, "kv_compaction_method": "snapkv"})
    assert (cfg.enabled, cfg.ratio, cfg.method) == (True, 20.0, "snapkv")
    assert cfg.trigger_tokens == SERVER.trigger_tokens
    assert request_config(SERVER, {"kv_compaction_ratio": 8})  # equal to the server's is allowed


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ({"kv_compaction_ratio": 4}, ["kv_compaction_ratio=4.0", "looser", ">= 8.0"]),
        ({"kv_compaction_ratio": 5000}, ["kv_compaction_ratio=5000", "out of range", "<= 1000.0"]),
        ({"kv_compaction_ratio": 7.999}, ["kv_compaction_ratio=7.999", "looser"]),
    ],
)
def test_request_cannot_loosen_the_server(extra, fragments):
    with pytest.raises(RequestOverrideError) as info:
        request_config(SERVER, extra)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.key == "kv_compaction_ratio"


def test_request_cannot_enable_compaction_on_a_server_without_it():
    off = CompactionConfig(enabled=False)
    with pytest.raises(RequestOverrideError, match="disabled on this server") as info:
        request_config(off, {"kv_compaction_enabled": 1})
    assert info.value.key == "kv_compaction_enabled"


def test_every_registry_method_is_accepted_per_request():
    for method in METHODS:
        assert request_config(SERVER, {"kv_compaction_method": method}).method == method


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=6)
keys = st.sampled_from([*KEYS, "kv_compaction_ratoi", "KV_Compaction_Ratio", "kv-compaction-method", "other_ext"]) | st.text()


@given(st.dictionaries(keys, json_values, max_size=4))
def test_any_xargs_either_give_a_valid_config_or_a_request_error_naming_one_of_their_keys(xargs):
    try:
        cfg = request_config(SERVER, xargs)
    except RequestOverrideError as e:
        assert e.key in xargs and is_compaction_key(e.key)
        assert str(e)
        return
    # Accepted: a config the model itself would accept, never looser than the server.
    CompactionConfig.model_validate(cfg.model_dump())
    if cfg.enabled:
        assert SERVER.ratio <= cfg.ratio <= MAX_RATIO and cfg.method in METHODS
    ours = {k for k in xargs if is_compaction_key(k)}
    assert ours <= set(KEYS)


def test_a_request_may_ask_to_compact_sooner_never_later():
    server = CompactionConfig(enabled=True, pool_watermark=0.25)
    assert request_config(server, {"kv_compaction_pool_watermark": 1}).pool_watermark == 1.0
    assert request_config(server, {"kv_compaction_pool_watermark": 0.25}).pool_watermark == 0.25
    for bad, fragment in ((0.1, "looser than this server's pool_watermark 0.25"), (1.5, "out of range"), (math.nan, "not a finite number"),
                          ("1", "not a number"), (True, "not a number")):
        with pytest.raises(RequestOverrideError, match=fragment) as err:
            request_config(server, {"kv_compaction_pool_watermark": bad})
        assert err.value.param == "vllm_xargs.kv_compaction_pool_watermark"
