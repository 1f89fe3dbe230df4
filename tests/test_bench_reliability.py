"""`bench reliability` without a server: what it sends (valid overrides pass the server's own check, invalid ones
fail it) and how it counts what came back (complete answers, lost requests, leaked pages, targets)."""

from __future__ import annotations

import random

from vllm_compact.benchmarks.reliability.cli import _parser
from vllm_compact.benchmarks.reliability.outcomes import (
    DISCONNECTED,
    INCOMPLETE,
    OK,
    REJECTED,
    SERVER_ERROR,
    Outcome,
    breakdown,
    judge_json,
    judge_stream,
    summarise,
)
from vllm_compact.benchmarks.reliability.report import markdown
from vllm_compact.benchmarks.reliability.request_specs import (
    RequestSpec,
    ServerRules,
    invalid_xargs,
    make_specs,
    parse_rules,
    request_body,
    valid_xargs,
)
from vllm_compact.benchmarks.reliability.server import preemptions
from vllm_compact.config import CompactionConfig
from vllm_compact.core.request_overrides import RequestOverrideError, request_config
from vllm_compact.server.compaction_api import per_request_help

SERVER = CompactionConfig(enabled=True, ratio=10.0)


def _accepted(xargs) -> bool:
    if not isinstance(xargs, dict):
        return False  # vLLM's own request model refuses a non-object vllm_xargs
    try:
        request_config(SERVER, xargs)
    except RequestOverrideError:
        return False
    return True


def test_rules_come_from_the_config_endpoint():
    rules = parse_rules({"config": SERVER.model_dump(), "per_request": per_request_help(SERVER)})
    assert rules.ratio == 10.0 and rules.enabled
    assert "am-highest-attention" in rules.methods and "snapkv" in rules.methods


def test_valid_overrides_pass_and_invalid_ones_fail_the_servers_check():
    rules = parse_rules({"config": SERVER.model_dump(), "per_request": per_request_help(SERVER)})
    rng = random.Random(0)
    for _ in range(400):
        assert _accepted(valid_xargs(rng, rules))
        xargs, key = invalid_xargs(rng, rules)
        assert not _accepted(xargs), xargs
        if key is not None:
            try:
                request_config(SERVER, xargs)
            except RequestOverrideError as e:
                assert e.key == key, (xargs, e.key)


def test_specs_are_seeded_and_mixed():
    args = _parser().parse_args(["--base-url", "http://x", "--requests", "400"])
    rules = ServerRules(ratio=10.0, methods=["none", "snapkv"])
    specs = make_specs(args, rules, source_tokens=5000)
    assert [s.xargs for s in specs] == [s.xargs for s in make_specs(args, rules, source_tokens=5000)]
    assert {s.endpoint for s in specs} == {"chat", "completions"} and {s.stream for s in specs} == {True, False}
    assert {s.overrides for s in specs} == {"none", "valid", "invalid"}
    assert any(s.disconnect_after_chunks for s in specs) and any(s.abandon_after_s for s in specs)
    assert all(200 <= s.prompt_tokens <= 900 and 8 <= s.max_tokens <= 24 for s in specs)
    assert not any(s.disconnect_after_chunks or s.abandon_after_s for s in specs if not s.expect_valid)
    chat = next(s for s in specs if s.endpoint == "chat" and s.include_usage and s.xargs is not None)
    body = request_body(chat, "m", "text")
    assert body["messages"][0]["content"].startswith("text") and body["stream_options"] == {"include_usage": True}
    assert body["vllm_xargs"] == chat.xargs


def _spec(**kw) -> RequestSpec:
    base = dict(index=0, endpoint="completions", stream=False, include_usage=False, prompt_tokens=300, max_tokens=8,
                overrides="none", expect_valid=True)
    return RequestSpec(**{**base, **kw})


def test_a_complete_answer_says_why_it_ended_and_length_means_max_tokens():
    spec = _spec()
    ok = {"choices": [{"text": "abc", "finish_reason": "length"}], "usage": {"completion_tokens": 8,
                                                                           "kv_compaction": {"compactions": 1}}}
    got = judge_json(spec, 200, ok, Outcome(0))
    assert (got.outcome, got.compactions) == (OK, 1)
    short = {"choices": [{"text": "abc", "finish_reason": "length"}], "usage": {"completion_tokens": 3}}
    assert judge_json(spec, 200, short, Outcome(0)).outcome == INCOMPLETE
    stop = {"choices": [{"text": "a.", "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}
    assert judge_json(spec, 200, stop, Outcome(0)).outcome == OK
    none = {"choices": [{"text": "a", "finish_reason": None}], "usage": {"completion_tokens": 1}}
    assert judge_json(spec, 200, none, Outcome(0)).outcome == INCOMPLETE
    rejected = judge_json(spec, 400, {"error": {"message": "bad", "param": "vllm_xargs.kv_compaction_ratio"}},
                          Outcome(0))
    assert (rejected.outcome, rejected.error_param) == (REJECTED, "vllm_xargs.kv_compaction_ratio")
    assert judge_json(spec, 500, {"error": {"message": "boom"}}, Outcome(0)).outcome == SERVER_ERROR


def test_streams_need_done_and_a_finish_reason_and_an_error_event_is_a_5xx():
    spec = _spec(endpoint="chat", stream=True, include_usage=True)
    events = [{"choices": [{"delta": {"content": "a"}, "finish_reason": None}]},
              {"choices": [{"delta": {"content": "b"}, "finish_reason": "length"}]},
              {"choices": [], "usage": {"completion_tokens": 8, "kv_compaction": {"compactions": 2}}}]
    got = judge_stream(spec, events, True, Outcome(0))
    assert (got.outcome, got.compactions, got.chunks) == (OK, 2, 3)
    assert judge_stream(spec, events, False, Outcome(0)).outcome == INCOMPLETE
    assert judge_stream(spec, events[:1], True, Outcome(0)).outcome == INCOMPLETE
    error = [events[0], {"error": {"message": "EngineDeadError", "code": 500}}]
    assert judge_stream(spec, error, True, Outcome(0)).outcome == SERVER_ERROR


def _stats(compactions: int, faults: int, free: int) -> dict:
    return {"worker": {"compactions": compactions, "faults_injected": faults, "failures": faults // 2},
            "scheduler": {"plans": compactions, "pressure_steps": 1}, "totals": {"running_requests": 0},
            "pool": {"free_pages": free, "total_pages": free + 1}}


def test_summary_counts_lost_requests_leaks_and_targets():
    specs = [_spec(index=0), _spec(index=1), _spec(index=2, overrides="invalid", expect_valid=False,
                                                    invalid_key="kv_compaction_ratio"),
             _spec(index=3, stream=True, disconnect_after_chunks=2), _spec(index=4), _spec(index=5)]
    outcomes = [Outcome(0, OK, 200, compactions=1), Outcome(1, OK, 200, compactions=0),
                Outcome(2, REJECTED, 400, error_param="vllm_xargs.kv_compaction_ratio"),
                Outcome(3, DISCONNECTED, 200), Outcome(4, SERVER_ERROR, 500), Outcome(5, INCOMPLETE, 200)]
    s = summarise(specs, outcomes, _stats(10, 1, 500), _stats(30, 5, 498), server_alive=True)
    assert (s["requests"], s["completed"], s["rejected_4xx"], s["errors_5xx"], s["disconnected"]) == (6, 2, 1, 1, 1)
    assert s["lost"] == 2  # the 500 and the incomplete one; not the rejected invalid one nor the disconnected one
    assert (s["compactions"], s["faults_injected"], s["fault_share"], s["plans"]) == (20, 4, 0.2, 20)
    assert s["pressure_steps"] == 0
    assert s["leaked_pages"] == -2 and s["rejections_naming_the_key"] == 1
    assert (s["answers_compacted"], s["answers_with_kv_usage"]) == (1, 2)
    assert not s["targets"]["lost == 0"] and not s["targets"]["leaked_pages == 0"]
    assert s["targets"]["faults_injected >= 10% of compactions"] and not s["targets"]["requests >= 1000"]
    rows = breakdown(specs, outcomes)
    assert sum(r.get("lost", 0) for r in rows) == 2
    md = markdown({"command": "vllm-compact bench reliability --base-url X", "summary": s, "server": None,
                   "settings": {"requests": 6, "concurrency": 2}, "wall_s": 60.0, "breakdown": rows,
                   "problems": [{"index": 4, "endpoint": "completions", "mode": "json", "overrides": "none",
                                 "outcome": SERVER_ERROR, "status": 500, "detail": "boom"}]})
    assert "`vllm-compact bench reliability --base-url X`" in md and "| 6 | 2 | 1 | 1 | 2 |" in md
    assert "lost == 0: **FAIL**" in md and "#4" in md


def test_a_server_without_stats_fails_the_page_targets():
    s = summarise([_spec()], [Outcome(0, OK, 200)], None, None, server_alive=False)
    assert s["leaked_pages"] is None and s["compactions"] is None
    assert not s["targets"]["leaked_pages == 0"] and not s["targets"]["server_alive"]


def test_preemptions_are_read_from_vllms_metrics():
    page = ("# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.\n"
            "# TYPE vllm:num_preemptions_total counter\n"
            'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0\n'
            'vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n')
    assert preemptions(page) == 3
    assert preemptions("vllm:num_requests_running 0.0\n") is None
