"""A live `vllm-compact serve` (tiny model, compaction on, API key set) driven by the official `openai` client.

One server for the whole session (tests/serving/conftest.py), shared with the other live modules: starting vLLM
costs far more than all the requests together.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from vllm_compact.server.kv_usage import engine_ids_pattern
from tests.serving.live_server import AUTH, MODEL, NO_EOS, RECENT, TRIGGER, kv, long_prompt, metric, stats, wait_idle

# The `server` and `client` fixtures (one tiny server for the session) are in tests/serving/conftest.py.


def test_completion_past_the_trigger_compacts_and_answers(server, client):
    before = metric(server, "vllm_compact_tokens_compacted_total")
    r = client.completions.create(model=MODEL, prompt=long_prompt(1), max_tokens=16, temperature=0, extra_body=NO_EOS)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.choices[0].text
    usage = kv(r.usage)
    # The KV length at the end: every token but the last sampled one, which is never fed back.
    assert usage["logical_tokens"] == r.usage.prompt_tokens + r.usage.completion_tokens - 1
    assert usage["compactions"] >= 1
    assert usage["physical_tokens"] < usage["logical_tokens"] / 2
    s = stats(server)
    assert s["config"]["trigger_tokens"] == TRIGGER and s["config"]["enabled"] is True
    assert s["scheduler"]["plans"] >= 1 and s["scheduler"]["pages_freed"] >= 1
    assert s["worker"]["compactions"] >= 1 and s["worker"]["failures"] == 0
    assert metric(server, "vllm_compact_tokens_compacted_total") > before
    assert metric(server, "vllm_compact_pages_freed_total") >= 1
    assert metric(server, "vllm_compact_compactions_total") >= 1
    assert metric(server, "vllm_compact_compaction_seconds_count") >= 1
    assert metric(server, "vllm_compact_compaction_seconds_sum") > 0


def test_short_prompt_is_not_compacted(client):
    r = client.completions.create(model=MODEL, prompt="hello there", max_tokens=4, extra_body=NO_EOS)
    usage = kv(r.usage)
    assert usage["compactions"] == 0
    assert usage["physical_tokens"] == usage["logical_tokens"] == r.usage.total_tokens - 1


def test_request_can_turn_compaction_off_or_compact_harder(client):
    def run(xargs: dict) -> dict:
        r = client.completions.create(model=MODEL, prompt=long_prompt(2), max_tokens=8, temperature=0,
                                      extra_body={**NO_EOS, "vllm_xargs": xargs})
        return kv(r.usage)

    off = run({"kv_compaction_enabled": False})
    assert off["compactions"] == 0 and off["physical_tokens"] == off["logical_tokens"]
    default = run({})
    harder = run({"kv_compaction_ratio": 40, "kv_compaction_method": "am-highest-attention"})
    assert default["compactions"] >= 1 and harder["compactions"] >= 1
    assert harder["logical_tokens"] == default["logical_tokens"] == off["logical_tokens"]
    assert harder["physical_tokens"] < default["physical_tokens"] < off["physical_tokens"]


def test_chat_completion_with_compaction(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt(3)}],
                                       max_tokens=12, extra_body=NO_EOS)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    usage = kv(r.usage)
    assert usage["compactions"] >= 1 and usage["physical_tokens"] < usage["logical_tokens"]


def test_streaming_reports_kv_usage_in_the_final_usage_chunk(client):
    stream = client.completions.create(model=MODEL, prompt=long_prompt(4), max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, extra_body=NO_EOS)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 12
    usage = kv(final.usage)
    assert usage["compactions"] >= 1
    assert usage["logical_tokens"] == final.usage.prompt_tokens + 12 - 1


def test_n_choices_share_the_prompt_and_report_their_sum(client):
    # No `seed`: vLLM 0.32's CPU runner crashes on seeded sampling when a prefill is chunked (stock bug).
    r = client.completions.create(model=MODEL, prompt=long_prompt(5), max_tokens=8, n=3, temperature=1.0,
                                  extra_body=NO_EOS)
    assert len(r.choices) == 3 and all(c.finish_reason == "length" for c in r.choices)
    usage = kv(r.usage)
    assert usage["logical_tokens"] == 3 * (r.usage.prompt_tokens + 8 - 1)
    assert usage["compactions"] >= 3


def test_logprobs_with_compaction(client):
    r = client.completions.create(model=MODEL, prompt=long_prompt(6), max_tokens=10, logprobs=3, temperature=0,
                                  extra_body=NO_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 10
    assert all(math.isfinite(x) and x <= 0 for x in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4  # the top 3, plus the sampled token when it is not among them
        assert max(top.values()) >= chosen - 1e-4  # greedy: the chosen token is the most likely one
    assert kv(r.usage)["compactions"] >= 1


@pytest.mark.parametrize(
    "xargs, param, fragment",
    [
        ({"kv_compaction_ratio": 2}, "vllm_xargs.kv_compaction_ratio", "looser than this server's ratio"),
        ({"kv_compaction_method": "zip"}, "vllm_xargs.kv_compaction_method", "allowed: am-highest-attention"),
        ({"kv_compaction_enabled": "maybe"}, "vllm_xargs.kv_compaction_enabled", "true, false, 0 or 1"),
        ({"kv_compaction_ratoi": 20}, "vllm_xargs.kv_compaction_ratoi", "unknown per-request compaction key"),
    ],
)
def test_bad_per_request_values_are_400_and_the_server_keeps_serving(server, client, xargs, param, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"vllm_xargs": xargs})
    assert info.value.status_code == 400 and fragment in str(info.value)
    raw = requests.post(f"{server.base_url}/v1/chat/completions", headers=AUTH, timeout=30,
                        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "vllm_xargs": xargs})
    assert raw.status_code == 400
    assert raw.json()["error"]["param"] == param and raw.json()["error"]["type"] == "BadRequestError"
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=NO_EOS)
    assert ok.usage.completion_tokens == 2


def test_compaction_endpoints_need_the_api_key(server):
    for path in ("/v1/compaction/stats", "/v1/compaction/config"):
        assert requests.get(f"{server.base_url}{path}", timeout=10).status_code == 401
        assert requests.get(f"{server.base_url}{path}", headers={"Authorization": "Bearer nope"},
                            timeout=10).status_code == 401
    config = requests.get(f"{server.base_url}/v1/compaction/config", headers=AUTH, timeout=10).json()
    assert config["config"]["recent_window_tokens"] == RECENT
    assert "kv_compaction_ratio" in config["per_request"]


def test_sixteen_concurrent_long_requests_complete_and_return_their_pages(server, client):
    def one(seed: int):
        r = client.completions.create(model=MODEL, prompt=long_prompt(100 + seed), max_tokens=16, temperature=0,
                                      extra_body=NO_EOS)
        return r.usage.completion_tokens, kv(r.usage)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(16)))
    assert [tokens for tokens, _ in results] == [16] * 16
    assert all(usage["compactions"] >= 1 for _, usage in results)
    idle = wait_idle(server)
    assert idle["totals"] == {"logical_tokens": 0, "physical_tokens": 0, "running_requests": 0}
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0


def test_client_abort_mid_stream_while_compacted_loses_no_pages(server, client):
    stream = client.completions.create(model=MODEL, prompt=long_prompt(7), max_tokens=1000, stream=True,
                                       extra_body=NO_EOS)
    first = next(iter(stream))
    pattern = engine_ids_pattern(first.id)
    deadline = time.monotonic() + 60
    compacted = False
    for _ in stream:  # keep reading until the engine shows this request compacted, then hang up
        entries = [e for rid, e in stats(server)["requests"].items() if pattern.fullmatch(rid)]
        compacted = bool(entries) and entries[0]["compactions"] >= 1
        if compacted or time.monotonic() > deadline:
            break
    stream.close()
    assert compacted
    idle = wait_idle(server)
    assert idle["totals"] == {"logical_tokens": 0, "physical_tokens": 0, "running_requests": 0}
    aborted = [e for rid, e in idle["requests"].items() if pattern.fullmatch(rid)]
    assert aborted and aborted[0]["finished"] and aborted[0]["logical_tokens"] < 770 + 1000
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0
    r = client.completions.create(model=MODEL, prompt=long_prompt(8), max_tokens=4, extra_body=NO_EOS)
    assert kv(r.usage)["compactions"] >= 1


def test_the_kv_pool_is_the_budget_less_the_compaction_workspace(server, client):
    """VLLM_CPU_KVCACHE_SPACE=1 (GiB) for the whole server: the pool gets that less workspace_mib (compaction's work
    outside the pool), to the page (tiny: 4 layers x K,V x 2 KV heads x 32 slots x 32 dims, fp32)."""
    client.completions.create(model=MODEL, prompt="hello", max_tokens=2, extra_body=NO_EOS)  # the first stats
    s = stats(server)
    page_bytes = 4 * 2 * 2 * 32 * 32 * 4
    expected_pages = (1024 - s["config"]["workspace_mib"]) * (1 << 20) // page_bytes
    assert s["config"]["workspace_mib"] == 128
    assert s["pool"]["total_pages"] == expected_pages, s["pool"]
