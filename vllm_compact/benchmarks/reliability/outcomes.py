"""What came back: each answer judged complete or not, and the run counted against its targets."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from vllm_compact.benchmarks.reliability.request_specs import RequestSpec

OK, REJECTED, SERVER_ERROR, DISCONNECTED, INCOMPLETE, TRANSPORT_ERROR = (
    "completed", "rejected", "server_error", "disconnected", "incomplete", "transport_error")


@dataclass
class Outcome:
    index: int
    outcome: str = INCOMPLETE
    status: int | None = None
    detail: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    compactions: int | None = None  # usage.kv_compaction.compactions when the answer carried it
    chunks: int = 0
    seconds: float = 0.0
    error_param: str | None = None  # a rejection's error.param


def complete_answer(finish_reason: str | None, completion_tokens: int | None, max_tokens: int) -> tuple[bool, str]:
    """Whether an answer is whole: it says why it ended, and "length" means max_tokens tokens."""
    if finish_reason not in ("length", "stop"):
        return False, f"finish_reason {finish_reason!r}"
    if finish_reason == "length" and completion_tokens is not None and completion_tokens != max_tokens:
        return False, f"finish_reason length after {completion_tokens} of {max_tokens} tokens"
    return True, ""


def judge_json(spec: RequestSpec, status: int, body: Any, out: Outcome) -> Outcome:
    """A non-streaming answer (or any non-200 answer)."""
    out.status = status
    if status >= 500:
        out.outcome, out.detail = SERVER_ERROR, _error_message(body)
        return out
    if status >= 400:
        out.outcome, out.detail = REJECTED, _error_message(body)
        out.error_param = (body.get("error") or {}).get("param") if isinstance(body, dict) else None
        return out
    if status != 200 or not isinstance(body, dict) or not body.get("choices"):
        out.detail = f"HTTP {status} without choices"
        return out
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    out.finish_reason = choice.get("finish_reason")
    out.completion_tokens = usage.get("completion_tokens")
    out.compactions = (usage.get("kv_compaction") or {}).get("compactions")
    text = choice.get("text") if spec.endpoint == "completions" else (choice.get("message") or {}).get("content")
    if not isinstance(text, str):
        out.detail = "no text in the answer"
        return out
    ok, why = complete_answer(out.finish_reason, out.completion_tokens, spec.max_tokens)
    out.outcome, out.detail = (OK, "") if ok else (INCOMPLETE, why)
    return out


def judge_stream(spec: RequestSpec, events: list[dict], done: bool, out: Outcome) -> Outcome:
    """A 200 stream: its data events in order, and whether `data: [DONE]` came."""
    out.status = 200
    tokens = 0
    for event in events:
        if "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            code = err.get("code")
            out.outcome = SERVER_ERROR if not isinstance(code, int) or code >= 500 else REJECTED
            out.detail = f"error event in the stream: {err.get('message', '')[:300]}"
            return out
        for choice in event.get("choices") or []:
            delta = choice.get("text") if spec.endpoint == "completions" else (choice.get("delta") or {}).get("content")
            if delta:
                tokens += 1
            if choice.get("finish_reason") is not None:
                out.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if usage:
            out.completion_tokens = usage.get("completion_tokens")
            out.compactions = (usage.get("kv_compaction") or {}).get("compactions")
    out.chunks = len(events)
    if not done:
        out.detail = "the stream ended before [DONE]"
        return out
    ok, why = complete_answer(out.finish_reason, out.completion_tokens, spec.max_tokens)
    out.outcome, out.detail = (OK, "") if ok else (INCOMPLETE, why)
    return out


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", ""))[:300]
        if "detail" in body:
            return str(body["detail"])[:300]
    return str(body)[:300]


def is_lost(spec: RequestSpec, out: Outcome) -> bool:
    """A request the server had to answer, not dropped on purpose, without a complete answer."""
    return spec.expect_valid and out.outcome not in (OK, DISCONNECTED)


def summarise(specs: list[RequestSpec], outcomes: list[Outcome], stats_start: dict | None, stats_end: dict | None,
              server_alive: bool) -> dict:
    by_index = {o.index: o for o in outcomes}
    pairs = [(s, by_index[s.index]) for s in specs if s.index in by_index]

    def worker(stats: dict | None, key: str) -> int | None:
        return None if stats is None else int((stats.get("worker") or {}).get(key, 0))

    def delta(key: str) -> int | None:
        a, b = worker(stats_start, key), worker(stats_end, key)
        return None if a is None or b is None else b - a

    def scheduler_delta(key: str) -> int | None:
        if stats_start is None or stats_end is None:
            return None
        return int(stats_end["scheduler"].get(key, 0)) - int(stats_start["scheduler"].get(key, 0))

    def free(stats: dict | None) -> int | None:
        return None if stats is None or "pool" not in stats else int(stats["pool"]["free_pages"])

    f0, f1 = free(stats_start), free(stats_end)
    compactions, faults = delta("compactions"), delta("faults_injected")
    with_usage = [o for _, o in pairs if o.outcome == OK and o.compactions is not None]
    summary = {
        "requests": len(pairs),
        "completed": sum(o.outcome == OK for _, o in pairs),
        "rejected_4xx": sum(o.status is not None and 400 <= o.status < 500 for _, o in pairs),
        "errors_5xx": sum(o.outcome == SERVER_ERROR for _, o in pairs),
        "lost": sum(is_lost(s, o) for s, o in pairs),
        "disconnected": sum(o.outcome == DISCONNECTED for _, o in pairs),
        "invalid_sent": sum(not s.expect_valid for s, _ in pairs),
        "invalid_accepted": sum(not s.expect_valid and o.status == 200 for s, o in pairs),
        "invalid_with_a_key": sum(not s.expect_valid and s.invalid_key is not None for s, _ in pairs),
        "rejections_naming_the_key": sum(
            not s.expect_valid and s.invalid_key is not None and o.outcome == REJECTED
            and o.error_param == f"vllm_xargs.{s.invalid_key}" for s, o in pairs),
        "compactions": compactions,
        "faults_injected": faults,
        "fault_share": None if not compactions or faults is None else round(faults / compactions, 3),
        "failures": delta("failures"),
        "plans": scheduler_delta("plans"),
        "pressure_steps": scheduler_delta("pressure_steps"),
        "rollbacks": scheduler_delta("rollbacks"),
        "answers_compacted": sum((o.compactions or 0) > 0 for o in with_usage),
        "answers_with_kv_usage": len(with_usage),
        "free_pages_start": f0,
        "free_pages_end": f1,
        "leaked_pages": None if f0 is None or f1 is None else f1 - f0,
        "server_alive": server_alive,
    }
    summary["targets"] = {
        "requests >= 1000": summary["requests"] >= 1000,
        "lost == 0": summary["lost"] == 0,
        "errors_5xx == 0": summary["errors_5xx"] == 0,
        "leaked_pages == 0": summary["leaked_pages"] == 0,
        "server_alive": server_alive,
        "faults_injected >= 10% of compactions": bool(compactions) and faults is not None
                                                 and faults >= 0.1 * compactions,
    }
    return summary


def breakdown(specs: list[RequestSpec], outcomes: list[Outcome]) -> list[dict]:
    """Outcomes per (endpoint, streaming, overrides)."""
    by_index = {o.index: o for o in outcomes}
    table: dict[tuple, Counter] = {}
    for s in specs:
        o = by_index.get(s.index)
        if o is None:
            continue
        key = (s.endpoint, "stream" if s.stream else "json", s.overrides)
        table.setdefault(key, Counter())[o.outcome] += 1
        table[key]["lost"] += is_lost(s, o)
    return [{"endpoint": k[0], "mode": k[1], "overrides": k[2], **dict(v)} for k, v in sorted(table.items())]
