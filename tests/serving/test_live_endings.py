"""Compacted requests through the live server (tests/serving/conftest.py) that end otherwise than on max_tokens: on
EOS and on a stop string, and streaming chat with `stream_options.include_usage`. Each frees every page it held."""

from __future__ import annotations

import requests

from tests.serving.live_server import AUTH, MODEL, NO_EOS, kv, long_prompt, stats, wait_idle

EOS = 2  # the tiny model's eos_token_id (config.json)


def completion(server, **body) -> dict:
    r = requests.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=300,
                      json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def idle_free_pages(server) -> int | None:
    if requests.get(f"{server.base_url}/v1/compaction/stats", headers=AUTH, timeout=10).status_code == 503:
        completion(server, prompt="hi", max_tokens=1)  # the engine writes its first stats file on its first step
    idle = wait_idle(server)
    assert idle["totals"] == {"logical_tokens": 0, "physical_tokens": 0, "running_requests": 0}
    return idle.get("pool", {}).get("free_pages")


def test_compacted_request_that_ends_on_eos_frees_its_pages(server):
    before = idle_free_pages(server)
    # min_tokens keeps EOS away for 5 tokens; then the bias makes it the greedy choice: the request ends on EOS
    # after its prompt (~770 tokens, trigger 64) was compacted.
    r = completion(server, prompt=long_prompt(21), max_tokens=40, min_tokens=5, logit_bias={str(EOS): 100})
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None  # EOS, not a stop string
    assert r["usage"]["completion_tokens"] == 6  # 5 tokens, then EOS
    usage = r["usage"]["kv_compaction"]
    assert usage["compactions"] >= 1 and usage["physical_tokens"] < usage["logical_tokens"]
    assert usage["logical_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] - 1
    assert idle_free_pages(server) == before


def test_compacted_request_that_ends_on_a_stop_string_frees_its_pages(server):
    before = idle_free_pages(server)
    prompt = long_prompt(22)
    full = completion(server, prompt=prompt, max_tokens=24, **NO_EOS)
    text = full["choices"][0]["text"]
    assert full["usage"]["kv_compaction"]["compactions"] >= 1 and len(text) >= 12, text
    # A stop string from the second half of the greedy answer: the same request now ends where it first occurs.
    middle = len(text) // 2
    stop = next(text[i : i + 3] for i in range(middle, len(text) - 2) if text[i : i + 3].strip())
    cut = text.find(stop)
    assert cut > 0
    r = completion(server, prompt=prompt, max_tokens=24, stop=[stop], **NO_EOS)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == text[:cut]
    assert r["usage"]["completion_tokens"] < 24
    usage = r["usage"]["kv_compaction"]
    assert usage["compactions"] >= 1 and usage["physical_tokens"] < usage["logical_tokens"]
    assert idle_free_pages(server) == before


def test_streaming_chat_with_include_usage_reports_kv_compaction(server, client):
    before = idle_free_pages(server)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt(23)}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert all(c.usage is None for c in chunks[:-1])  # only the final chunk carries usage
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 10
    usage = kv(final.usage)
    assert usage["compactions"] >= 1 and usage["physical_tokens"] < usage["logical_tokens"]
    assert usage["logical_tokens"] == final.usage.prompt_tokens + 10 - 1
    matching = [e for rid, e in stats(server)["requests"].items() if rid.startswith(final.id)]
    assert matching and matching[0]["compactions"] == usage["compactions"]
    assert idle_free_pages(server) == before
