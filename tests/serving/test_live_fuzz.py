"""Property-based HTTP fuzz of /v1/completions and /v1/chat/completions on the live server (tests/serving/conftest.py):
random `vllm_xargs` (valid and invalid compaction keys, other cases and spellings of them, odd types, nested objects,
huge and non-finite numbers, non-objects) and random other body fields.

For every example: never a 5xx. Where `request_config` (the one validation path) refuses the raw `vllm_xargs`, the
answer is a 400 whose `param` names the field it named; where everything in the body is valid, the answer is a
complete 200 (a stream ends with [DONE] and no error event). At the end the server is alive, /health answers and no
request holds a page.
"""

from __future__ import annotations

import json
import math

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_compact.config import CompactionConfig
from vllm_compact.core.request_overrides import KEYS, METHODS, RequestOverrideError, request_config
from tests.serving.live_server import AUTH, MODEL, long_prompt, stats, wait_idle

# Numbers JSON can write but Python cannot hold as they are, put into the body as text: 1e400 (json.loads makes it
# inf) and a 5000-digit integer (past Python's int digit limit: json.loads refuses the whole body).
BIG_FLOAT = "__1e400__"
HUGE_INT = "__10**5000__"
RAW_NUMBERS = {BIG_FLOAT: "1e400", HUGE_INT: "1" + "0" * 5000}

# ---- vllm_xargs ----------------------------------------------------------------------------------------------

odd_numbers = st.sampled_from([math.inf, -math.inf, math.nan, 10**400, -(10**30), 1e300, 0, -1, 0.5, 1, 8, 999.9,
                               1000, 1000.0001, BIG_FLOAT, HUGE_INT])
odd_scalars = (st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | odd_numbers
               | st.text(max_size=8) | st.sampled_from(["inf", "nan", "1e400", "16", "true", "false", ""]))
odd_values = st.recursive(odd_scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=2), max_leaves=5)
good_values = {
    "kv_compaction_enabled": st.booleans() | st.sampled_from([0, 1]),
    "kv_compaction_ratio": st.integers(10, 1000) | st.floats(10.0, 1000.0),
    "kv_compaction_method": st.sampled_from(METHODS),
    "kv_compaction_pool_watermark": st.sampled_from([1, 1.0]),  # the live server's own watermark is 1
}
compaction_looking_keys = st.sampled_from(["KV_Compaction_Ratio", "kv-compaction-method", "kv_compaction_ratoi",
                                           "kvCompactionEnabled", "kv_compaction", "KV_COMPACTION_TRIGGER"])
foreign_keys = st.sampled_from(["other_ext", "session_id_x", "foo"]) | st.text(max_size=6)
vllm_typed = st.text(max_size=6) | st.integers(-100, 100) | st.floats(allow_nan=False, allow_infinity=False)
foreign_values = vllm_typed | st.lists(vllm_typed, max_size=2)


@st.composite
def xargs(draw):
    kind = draw(st.sampled_from(["absent", "valid", "valid", "valid", "odd_values", "odd_values", "odd_keys",
                                 "not_object", "foreign"]))
    if kind == "absent":
        return None
    if kind == "not_object":
        return draw(st.sampled_from([[1], "kv_compaction_ratio=20", 20, True, [{"kv_compaction_ratio": 20}], ""]))
    out = {}
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=3)):
        out[key] = draw(good_values[key])
    if kind == "odd_values":
        out[draw(st.sampled_from(KEYS))] = draw(odd_values)
    elif kind == "odd_keys":
        out[draw(compaction_looking_keys)] = draw(odd_values)
    if kind == "foreign" or draw(st.booleans()):
        out[draw(foreign_keys)] = draw(foreign_values)
    return out


# ---- other body fields: (value, whether vLLM must accept it) ------------------------------------------------

def field(valid, invalid):
    """(value, valid): invalid one time in five."""
    return st.integers(0, 4).flatmap(lambda i: invalid.map(lambda v: (v, False)) if i == 0
                                     else valid.map(lambda v: (v, True)))


MAX_TOKENS = field(st.integers(1, 3), st.sampled_from([0, -1, "2", 1.5, 10**30, 10**6, []]))
TEMPERATURE = field(st.sampled_from([0, 0.0, 0.7, 1.0]), st.sampled_from([-1, "hot", 1e9, [0]]))
PROMPTS = st.sampled_from(["hi", "hello there", "w1 w2 w3", "x" * 300]) | st.integers(0, 9).map(long_prompt)


@st.composite
def body(draw, chat: bool):
    valid = True
    out: dict = {"model": MODEL}
    if draw(st.integers(0, 9)) == 0:
        out["model"], valid = draw(st.sampled_from(["nope", "", 3, None])), False
    prompt = draw(PROMPTS) if draw(st.integers(0, 5)) else draw(st.sampled_from(["hi", "hello"]))
    if chat:
        out["messages"] = [{"role": "user", "content": prompt}]
        if draw(st.integers(0, 9)) == 0:
            out["messages"], valid = draw(st.sampled_from([[], "hi", [{"role": "user"}], [{"content": 3}]])), False
    else:
        out["prompt"] = prompt
        if draw(st.integers(0, 9)) == 0:
            out["prompt"], valid = draw(st.sampled_from([None, 3, {"a": 1}, [[-5]]])), False
    (out["max_tokens"], ok) = draw(MAX_TOKENS)
    valid &= ok
    if draw(st.booleans()):
        (out["temperature"], ok) = draw(TEMPERATURE)
        valid &= ok
    if draw(st.booleans()):
        out["ignore_eos"] = True
    if draw(st.integers(0, 3)) == 0:
        out["n"] = 2
        valid &= out.get("temperature") != 0  # vLLM refuses n > 1 with greedy sampling (HTTP 400)
    if draw(st.integers(0, 3)) == 0:
        out["stop"] = draw(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=2))
    if draw(st.integers(0, 2)) == 0:
        out["stream"] = True
        if draw(st.booleans()):
            out["stream_options"] = {"include_usage": True}
    x = draw(xargs())
    if x is not None:
        out["vllm_xargs"] = x
    return out, valid


def encode(payload: dict) -> bytes:
    text = json.dumps(payload)
    for marker, raw in RAW_NUMBERS.items():
        text = text.replace(json.dumps(marker), raw)
    return text.encode()


UNPARSEABLE = object()


def as_parsed(value):
    """What the server's JSON parser makes of a value this test sends (UNPARSEABLE: it refuses the body)."""
    try:
        return json.loads(encode({"v": value}))["v"]
    except ValueError:
        return UNPARSEABLE


def vllm_accepts_xargs(x) -> bool:
    """vLLM's own type for vllm_xargs: dict[str, str | int | float | list[str | int | float]]."""
    def scalar(v):
        return isinstance(v, (str, int, float)) and not (isinstance(v, float) and not math.isfinite(v))
    return x is None or (isinstance(x, dict) and all(scalar(v) or (isinstance(v, list) and all(map(scalar, v)))
                                                     for v in x.values()))


@pytest.fixture(scope="module")
def server_config(server) -> CompactionConfig:
    r = requests.get(f"{server.base_url}/v1/compaction/config", headers=AUTH, timeout=10)
    return CompactionConfig.model_validate(r.json()["config"])


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(server, server_config, counts, path: str, payload: dict, valid: bool) -> None:
    counts["examples"] += 1
    r = requests.post(f"{server.base_url}{path}", data=encode(payload), timeout=300,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:2000], payload)
    sent = as_parsed(payload.get("vllm_xargs")) if "vllm_xargs" in payload else None
    if sent is UNPARSEABLE:
        assert r.status_code == 400, (r.text[:2000], payload)  # vLLM's own answer to a body it cannot parse
        return
    try:
        request_config(server_config, sent)
    except RequestOverrideError as e:
        counts["rejected_by_us"] += 1
        assert r.status_code == 400, (r.text[:2000], payload)
        error = r.json()["error"]
        assert error["param"] == e.param and error["type"] == "BadRequestError", (error, payload)
        return
    if not (valid and vllm_accepts_xargs(sent)):
        return  # vLLM's own validation decides; only "no 5xx" is asserted
    assert r.status_code == 200, (r.text[:2000], payload)
    counts["ok"] += 1
    if payload.get("stream"):
        events = [e for e in r.text.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e[:40] for e in events), r.text[-2000:]
    else:
        answer = r.json()
        assert len(answer["choices"]) == payload.get("n", 1)
        assert "kv_compaction" in answer["usage"], answer["usage"]


def test_fuzz_completion_routes_never_5xx_and_the_server_stays_alive(server, server_config):
    counts = {"examples": 0, "rejected_by_us": 0, "ok": 0}

    @FUZZ
    @given(case=body(chat=False))
    def completions(case):
        check(server, server_config, counts, "/v1/completions", *case)

    @FUZZ
    @given(case=body(chat=True))
    def chat_completions(case):
        check(server, server_config, counts, "/v1/chat/completions", *case)

    completions()
    chat_completions()
    assert server.process.poll() is None, server.log_tail()
    assert requests.get(f"{server.base_url}/health", timeout=10).status_code == 200
    idle = wait_idle(server)
    assert idle["totals"] == {"logical_tokens": 0, "physical_tokens": 0, "running_requests": 0}
    assert stats(server)["worker"]["failures"] == 0
    print("fuzz outcomes:", counts)
    # Both outcomes were really exercised (the examples are derandomised: this holds run after run).
    assert counts["examples"] >= 200 and counts["rejected_by_us"] >= 50 and counts["ok"] >= 30, counts
