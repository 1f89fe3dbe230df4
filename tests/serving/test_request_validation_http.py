"""Per-request validation in the API middleware, in-process in front of the stand-in for vLLM's routes: the raw
JSON body is checked by `request_config` (the one validation path), so the cases vLLM's request model would blur
(a JSON `true` where a number goes becomes 1, 1e400 becomes inf) are still refused, each with a 400 in vLLM's
error shape whose `param` names the field."""

from __future__ import annotations

import json

import pytest

from vllm_compact.server.compaction_api import _json_object
from tests.serving.test_compaction_api import AUTH, env  # noqa: F401  (the stand-in app fixture)

# raw JSON of vllm_xargs -> the param the 400 names, a fragment of its message
BAD_RAW = [
    ('{"kv_compaction_ratio": true}', "vllm_xargs.kv_compaction_ratio", "a boolean, not a number"),
    ('{"kv_compaction_ratio": false}', "vllm_xargs.kv_compaction_ratio", "a boolean, not a number"),
    ('{"kv_compaction_ratio": 1e400}', "vllm_xargs.kv_compaction_ratio", "not a finite number"),
    ('{"kv_compaction_ratio": -1e400}', "vllm_xargs.kv_compaction_ratio", "not a finite number"),
    ('{"kv_compaction_ratio": NaN}', "vllm_xargs.kv_compaction_ratio", "not a finite number"),
    ('{"kv_compaction_ratio": Infinity}', "vllm_xargs.kv_compaction_ratio", "not a finite number"),
    ('{"kv_compaction_ratio": 1' + "0" * 400 + "}", "vllm_xargs.kv_compaction_ratio", "not a finite number"),
    ('{"kv_compaction_ratio": 1e300}', "vllm_xargs.kv_compaction_ratio", "out of range"),
    ('{"kv_compaction_ratio": "inf"}', "vllm_xargs.kv_compaction_ratio", "a string, not a number"),
    ('{"kv_compaction_ratio": "nan"}', "vllm_xargs.kv_compaction_ratio", "a string, not a number"),
    ('{"kv_compaction_ratio": "16"}', "vllm_xargs.kv_compaction_ratio", "a string, not a number"),
    ('{"kv_compaction_ratio": [16]}', "vllm_xargs.kv_compaction_ratio", "a list, not a number"),
    ('{"kv_compaction_ratio": {"value": 16}}', "vllm_xargs.kv_compaction_ratio", "an object, not a number"),
    ('{"kv_compaction_ratio": null}', "vllm_xargs.kv_compaction_ratio", "null, not a number"),
    ('{"kv_compaction_enabled": "false"}', "vllm_xargs.kv_compaction_enabled", "not a boolean"),
    ('{"kv_compaction_enabled": {"on": false}}', "vllm_xargs.kv_compaction_enabled", "not a boolean"),
    ('{"kv_compaction_method": ["snapkv"]}', "vllm_xargs.kv_compaction_method", "not a compaction method"),
    ('{"KV_Compaction_Ratio": 16}', "vllm_xargs.KV_Compaction_Ratio", "did you mean 'kv_compaction_ratio'"),
    ('{"Kv_Compaction_Enabled": false}', "vllm_xargs.Kv_Compaction_Enabled", "did you mean 'kv_compaction_enabled'"),
    ('{"kv-compaction-method": "snapkv"}', "vllm_xargs.kv-compaction-method", "did you mean 'kv_compaction_method'"),
    ('{"other": 1, "kv_compaction_ratio": 16, "kv_compaction_x": 1}', "vllm_xargs.kv_compaction_x", "unknown"),
    ('"kv_compaction_ratio=16"', "vllm_xargs", "vllm_xargs must be an object"),
    ('[{"kv_compaction_ratio": 16}]', "vllm_xargs", "vllm_xargs must be an object"),
    ("16", "vllm_xargs", "vllm_xargs must be an object"),
    ("true", "vllm_xargs", "vllm_xargs must be an object"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("raw, param, fragment", BAD_RAW, ids=[b[0][:40] for b in BAD_RAW])
def test_bad_raw_vllm_xargs_is_a_400_naming_the_field(env, path, raw, param, fragment):  # noqa: F811
    client, _, received = env
    body = '{"model": "m", "prompt": "x", "messages": [], "vllm_xargs": ' + raw + "}"
    r = client.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", param, 400)
    assert fragment in error["message"]
    assert received == []


@pytest.mark.parametrize("raw", ["null", "{}", '{"other_ext": {"nested": [1, {"a": true}]}}',
                                 '{"kv_compaction_ratio": 16, "kv_compaction_enabled": true}',
                                 '{"kv_compaction_enabled": 0, "kv_compaction_method": "snapkv"}'])
def test_valid_or_foreign_vllm_xargs_reach_the_app_unchanged(env, raw):  # noqa: F811
    client, _, received = env
    body = '{"model": "m", "prompt": "x", "vllm_xargs": ' + raw + "}"
    r = client.post("/v1/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert received and received[-1]["vllm_xargs"] == json.loads(raw)


def test_bodies_the_middleware_cannot_parse_are_left_to_vllm():
    assert _json_object(b"[" * 100_000 + b"]" * 100_000) is None  # too deep for json: no RecursionError escapes
    assert _json_object(b'{"a": 1' + b"0" * 5000 + b"}") is None  # past Python's int digit limit
    assert _json_object(b"not json") is None and _json_object(b"[1]") is None
