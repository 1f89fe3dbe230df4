"""The API-server middleware in-process, in front of a stand-in for vLLM's routes, with stats files written here.

The stand-in app is stacked the way vLLM stacks it (vLLM's own API-key middleware inside, ours outside, as
`--middleware` does), so auth, error shape and body replay are checked against vLLM's real classes.
"""

from __future__ import annotations

import json
import threading
import time
from argparse import Namespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from starlette.testclient import TestClient

from vllm_compact.config import CompactionConfig
from vllm_compact.core.stats_file import write_stats_file
from vllm_compact.server import kv_usage
from vllm_compact.server.kv_usage import StatsReader, engine_ids_pattern
from vllm_compact.server.metrics import register_collector
from tests.serving.stats_payloads import payload, request

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVER = CompactionConfig(enabled=True, ratio=8.0)
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def completion(response_id: str) -> dict:
    return {"id": response_id, "object": "text_completion", "choices": [{"index": 0, "text": "hi"}], "usage": dict(USAGE)}


def sse(chunks: list[dict]) -> list[bytes]:
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


STREAM_CHUNKS = [
    {"id": "cmpl-s", "choices": [{"index": 0, "text": "a"}]},
    {"id": "cmpl-s", "choices": [{"index": 0, "text": "b"}], "usage": dict(USAGE)},  # continuous usage: untouched
    {"id": "cmpl-s", "choices": [], "usage": dict(USAGE)},  # the final usage chunk
]


def stand_in_app(received: list) -> FastAPI:
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    from vllm_compact.server.compaction_api import CompactionMiddleware

    app = FastAPI()
    app.state.args = Namespace(api_key=[KEY], allowed_origins=["*"], allow_credentials=False,
                               allowed_methods=["*"], allowed_headers=["*"])

    @app.post("/v1/completions")
    async def completions(raw: Request):
        body = await raw.json()
        received.append(body)
        if body.get("stream"):
            data = b"".join(sse(STREAM_CHUNKS))
            # Cut the stream at odd places: events must be reassembled across body messages.
            pieces = [data[i : i + 37] for i in range(0, len(data), 37)]

            async def gen():
                for piece in pieces:
                    yield piece

            return StreamingResponse(gen(), media_type="text/event-stream")
        return completion(body.get("id_to_use", "cmpl-abc"))

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        received.append(await raw.json())
        return {**completion("chatcmpl-xyz"), "object": "chat.completion"}

    @app.post("/v1/other")
    async def other(raw: Request):
        received.append(await raw.json())
        return {"ok": True}

    app.add_middleware(AuthenticationMiddleware, tokens=[KEY])
    app.add_middleware(CompactionMiddleware)
    return app


@pytest.fixture
def env(tmp_path, monkeypatch):
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("VLLM_COMPACT_CONFIG", SERVER.to_env())
    monkeypatch.setenv("VLLM_COMPACT_STATS_PATH", str(stats))
    monkeypatch.setattr(kv_usage, "FINAL_STATS_WAIT_S", 0.3)
    received: list = []
    with TestClient(stand_in_app(received)) as client:
        yield client, stats, received


def test_valid_request_is_passed_on_unchanged_and_gets_its_kv_usage(env):
    client, stats, received = env
    write_stats_file(stats, payload({
        "0_cmpl-abc-0-0123abcd": request(300, 120, 2),
        "1_cmpl-abc-0-0123abcd": request(301, 121, 2),
        "cmpl-abcd-0-0123abcd": request(999, 999, 9),  # another response whose id starts the same
    }))
    body = {"model": "m", "prompt": "x", "n": 2, "vllm_xargs": {"kv_compaction_ratio": 16, "other": "v"}}
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200
    assert received == [body]
    got = r.json()
    assert got["usage"] == {**USAGE, "kv_compaction": {"logical_tokens": 601, "physical_tokens": 241, "compactions": 4}}
    assert int(r.headers["content-length"]) == len(r.content)


def test_chat_response_ids_map_to_engine_ids(env):
    client, stats, _ = env
    write_stats_file(stats, payload({"chatcmpl-xyz-89abcdef": request(40, 40, 0)}))
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH)
    assert r.json()["usage"]["kv_compaction"] == {"logical_tokens": 40, "physical_tokens": 40, "compactions": 0}


@pytest.mark.parametrize(
    "xargs, param, fragment",
    [
        ({"kv_compaction_ratio": 2}, "vllm_xargs.kv_compaction_ratio", "looser than this server's ratio 8.0"),
        ({"kv_compaction_method": "zip"}, "vllm_xargs.kv_compaction_method", "allowed: am-highest-attention"),
        ({"kv_compaction_enabled": "perhaps"}, "vllm_xargs.kv_compaction_enabled", "true, false, 0 or 1"),
        ({"kv_compaction_typo": 1}, "vllm_xargs.kv_compaction_typo", "unknown per-request compaction key"),
    ],
)
def test_bad_per_request_value_is_a_400_in_vllm_error_shape(env, xargs, param, fragment):
    client, _, received = env
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "vllm_xargs": xargs}, headers=AUTH)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", param, 400)
    assert fragment in error["message"]
    assert received == []  # never reached the engine
    ok = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=AUTH)
    assert ok.status_code == 200  # and the next request is served


def test_other_json_endpoints_are_validated_too_and_bodies_replayed(env):
    client, _, received = env
    bad = client.post("/v1/other", json={"vllm_xargs": {"kv_compaction_ratio": "x"}}, headers=AUTH)
    assert bad.status_code == 400
    good = client.post("/v1/other", json={"vllm_xargs": {"kv_compaction_enabled": 0}, "big": "y" * 100_000},
                       headers=AUTH)
    assert good.json() == {"ok": True}
    assert received[-1]["big"] == "y" * 100_000


def test_without_the_api_key_everything_is_401_as_in_vllm(env):
    client, stats, received = env
    write_stats_file(stats, payload({}))
    for method, path, kwargs in (
        ("GET", "/v1/compaction/stats", {}),
        ("GET", "/v1/compaction/config", {}),
        ("POST", "/v1/completions", {"json": {"prompt": "x", "vllm_xargs": {"kv_compaction_ratio": 1}}}),
        ("POST", "/v1/completions", {"json": {"prompt": "x"}}),
    ):
        r = client.request(method, path, headers={"Authorization": "Bearer wrong"}, **kwargs)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"}), path
    assert received == []


def test_stats_endpoint_serves_the_file_and_503_before_it_exists(env):
    client, stats, _ = env
    r = client.get("/v1/compaction/stats", headers=AUTH)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == 503
    written = payload({"r": request(1, 1, 0)}, compactions=3, seconds=(0.01, 0.2))
    write_stats_file(stats, written)
    assert client.get("/v1/compaction/stats", headers=AUTH).json() == written


def test_config_endpoint_reports_the_server_settings_and_the_per_request_keys(env):
    client, _, _ = env
    got = client.get("/v1/compaction/config", headers=AUTH).json()
    assert got["config"] == SERVER.model_dump()
    assert set(got["per_request"]) == {"kv_compaction_enabled", "kv_compaction_ratio", "kv_compaction_method"}
    assert ">= 8.0" in got["per_request"]["kv_compaction_ratio"]


def test_stream_final_usage_chunk_gets_kv_usage_and_the_rest_is_byte_identical(env):
    client, stats, _ = env
    write_stats_file(stats, payload({"cmpl-s-0-aaaaaaaa": request(70, 30, 1)}))
    r = client.post("/v1/completions", json={"prompt": "x", "stream": True}, headers=AUTH)
    events = r.content.split(b"\n\n")
    expected = sse(STREAM_CHUNKS)
    assert events[0] + b"\n\n" == expected[0]
    assert events[1] + b"\n\n" == expected[1]
    final = json.loads(events[2].removeprefix(b"data: "))
    assert final["usage"] == {**USAGE, "kv_compaction": {"logical_tokens": 70, "physical_tokens": 30, "compactions": 1}}
    assert events[3:] == [b"data: [DONE]", b""]


def test_usage_waits_for_the_requests_to_finish_and_is_left_out_if_they_never_do(env):
    client, stats, _ = env
    write_stats_file(stats, payload({"cmpl-abc-0-0123abcd": request(10, 10, 0, finished=False)}))
    r = client.post("/v1/completions", json={"prompt": "x"}, headers=AUTH)
    assert "kv_compaction" not in r.json()["usage"]  # never reported half-done numbers

    def finish_soon():
        time.sleep(0.1)
        write_stats_file(stats, payload({"cmpl-abc-0-0123abcd": request(12, 11, 1)}))

    thread = threading.Thread(target=finish_soon)
    thread.start()
    r = client.post("/v1/completions", json={"prompt": "x"}, headers=AUTH)
    thread.join()
    assert r.json()["usage"]["kv_compaction"] == {"logical_tokens": 12, "physical_tokens": 11, "compactions": 1}


def test_usage_of_several_prompts_waits_for_all_of_them(env):
    client, stats, _ = env
    write_stats_file(stats, payload({"cmpl-abc-0-0123abcd": request(10, 10, 0)}))
    r = client.post("/v1/completions", json={"prompt": ["a", "b"]}, headers=AUTH)
    assert "kv_compaction" not in r.json()["usage"]  # the second prompt's request is missing
    write_stats_file(stats, payload({"cmpl-abc-0-0123abcd": request(10, 10, 0), "cmpl-abc-1-0123abcf": request(5, 4, 1)}))
    r = client.post("/v1/completions", json={"prompt": ["a", "b"]}, headers=AUTH)
    assert r.json()["usage"]["kv_compaction"] == {"logical_tokens": 15, "physical_tokens": 14, "compactions": 1}


@pytest.mark.parametrize(
    "engine_id, matches",
    [
        ("cmpl-abc-0-0123abcd", True),
        ("3_cmpl-abc-1-0123abcd", True),
        ("cmpl-abc-0", True),  # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION
        ("cmpl-abcd-0-0123abcd", False),
        ("cmpl-abc-1-0-0123abcd", False),  # response "cmpl-abc-1"
        ("xcmpl-abc-0-0123abcd", False),
    ],
)
def test_engine_id_matching(engine_id, matches):
    assert bool(engine_ids_pattern("cmpl-abc").fullmatch(engine_id)) is matches


def test_prometheus_collector_reads_the_file(tmp_path):
    registry = CollectorRegistry()
    path = tmp_path / "stats.json"
    register_collector(StatsReader(str(path)), registry)
    before = generate_latest(registry).decode()
    assert "vllm_compact_compactions_total 0.0" in before  # zeros before the first file
    write_stats_file(path, payload({}, compactions=3, seconds=(0.004, 0.02, 30.0), physical=96, logical=320))
    text = generate_latest(registry).decode()
    for line in (
        "vllm_compact_compactions_total 3.0",
        "vllm_compact_failures_total 0.0",
        "vllm_compact_tokens_compacted_total 192.0",
        "vllm_compact_pages_freed_total 6.0",
        "vllm_compact_logical_tokens 320.0",
        "vllm_compact_physical_tokens 96.0",
        "vllm_compact_outside_pool_bytes 12288.0",
        "vllm_compact_outside_pool_ratio_max 0.25",
        'vllm_compact_compaction_seconds_bucket{le="0.0025"} 0.0',
        'vllm_compact_compaction_seconds_bucket{le="0.005"} 1.0',
        'vllm_compact_compaction_seconds_bucket{le="0.025"} 2.0',
        'vllm_compact_compaction_seconds_bucket{le="10.0"} 2.0',
        'vllm_compact_compaction_seconds_bucket{le="+Inf"} 3.0',
        "vllm_compact_compaction_seconds_count 3.0",
        "vllm_compact_compaction_seconds_sum 30.024",
    ):
        assert line in text, line
    path.write_text("garbage")
    assert "vllm_compact_compactions_total 0.0" in generate_latest(registry).decode()  # vLLM's /metrics survives
