"""`vllm-compact bench reliability`: many requests, bad ones and faults included, against a LIVE compacting server.

Drives a running `vllm-compact serve ... --kv-compaction` over HTTP (`--base-url`), or starts one itself
(`--start-server`: its own process group, the test-only fault switch VLLM_COMPACT_FAULTS in its environment,
stopped by signalling the group at the end). Every request is drawn at random (seeded):

- /v1/completions or /v1/chat/completions, streaming (sometimes with include_usage) or not;
- a prompt of --min-prompt..--max-prompt tokens of essay text (most cross the server's compaction trigger), a
  max_tokens of --min-tokens..--max-tokens, sometimes a stop string or ignore_eos;
- no per-request compaction keys, valid ones (`vllm_xargs.kv_compaction_ratio|method|enabled`, from what
  GET /v1/compaction/config allows), or invalid ones (wrong types, NaN/inf, looser or out-of-range ratios,
  unknown methods or keys, a non-object vllm_xargs), which must get an HTTP 4xx and never reach the engine;
- a deliberate client disconnect: a stream closed after a few chunks, a non-streaming request abandoned after a
  random delay.

Counted: `completed` (a complete answer: finish_reason set, and max_tokens tokens when it is "length"),
`rejected_4xx`, `errors_5xx` (HTTP 5xx, and error events inside a 200 stream), `lost` (a request that should have
been answered, was not deliberately disconnected and did not get a complete answer), `compactions`,
`faults_injected` and `failures` (worker counters from GET /v1/compaction/stats, end minus start), `leaked_pages`
(the KV pool's free pages at the end minus at the start, both read with the server idle), `server_alive` (/health
and one last completion answer at the end). Writes JSON + markdown (with this exact command) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KEY_ENABLED = "kv_compaction_enabled"
KEY_RATIO = "kv_compaction_ratio"
KEY_METHOD = "kv_compaction_method"

OK, REJECTED, SERVER_ERROR, DISCONNECTED, INCOMPLETE, TRANSPORT_ERROR = (
    "completed", "rejected", "server_error", "disconnected", "incomplete", "transport_error")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running compacting server, e.g. http://127.0.0.1:8000 (started with "
                       "VLLM_COMPACT_FAULTS=rate=R,seed=S in its environment to inject faults)")
    where.add_argument("--start-server", action="store_true",
                       help="start `vllm-compact serve MODEL --kv-compaction ...` here, with the fault switch set, "
                            "and stop it at the end")
    p.add_argument("--model", default="smollm2-135m",
                   help="our model name or a path: the tokenizer for the prompts, and the model --start-server serves "
                        "(default: %(default)s)")
    p.add_argument("--requests", type=int, default=1000, help="requests to send (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--min-prompt", type=int, default=200, help="shortest prompt, tokens (default: %(default)s)")
    p.add_argument("--max-prompt", type=int, default=900, help="longest prompt, tokens (default: %(default)s)")
    p.add_argument("--min-tokens", type=int, default=8, help="smallest max_tokens (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens (default: %(default)s)")
    p.add_argument("--chat-share", type=float, default=0.5, help="share of chat completions (default: %(default)s)")
    p.add_argument("--stream-share", type=float, default=0.5, help="share of streaming requests (default: %(default)s)")
    p.add_argument("--valid-override-share", type=float, default=0.35,
                   help="share of requests with valid kv_compaction_* keys (default: %(default)s)")
    p.add_argument("--invalid-override-share", type=float, default=0.2,
                   help="share of requests with invalid ones, which must be rejected (default: %(default)s)")
    p.add_argument("--disconnect-share", type=float, default=0.1,
                   help="share of requests the client drops before the answer is complete (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="seconds a client waits for one answer before counting it lost (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=180.0,
                   help="seconds to wait for the server to go idle before reading its free pages "
                        "(default: %(default)s)")
    server = p.add_argument_group("--start-server")
    server.add_argument("--fault-rate", type=float, default=0.25,
                        help="VLLM_COMPACT_FAULTS rate: share of compaction solves that raise or return NaN "
                             "(default: %(default)s)")
    server.add_argument("--fault-seed", type=int, default=0, help="VLLM_COMPACT_FAULTS seed (default: %(default)s)")
    server.add_argument("--trigger", type=int, default=256, help="--kv-compaction-trigger (default: %(default)s)")
    server.add_argument("--recent-window", type=int, default=64,
                        help="--kv-compaction-recent-window (default: %(default)s)")
    server.add_argument("--server-args", default="--block-size 32 --max-model-len 2048 --enforce-eager",
                        help="more `vllm-compact serve` flags, one string: --server-args=\"--block-size 32 ...\" (default: %(default)r)")
    server.add_argument("--server-log", default=None,
                        help="where the server's output goes (default: beside --out, <out>_server.log; not "
                             "meant to be committed)")
    server.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for /health (default: %(default)s)")
    p.add_argument("--out", default="bench/results/reliability.json", help="JSON result; markdown beside it")
    return p


# ---- what to send ---------------------------------------------------------------------------------------------


@dataclass
class RequestSpec:
    index: int
    endpoint: str              # "completions" | "chat"
    stream: bool
    include_usage: bool
    prompt_tokens: int
    max_tokens: int
    overrides: str             # "none" | "valid" | "invalid"
    expect_valid: bool         # the server must answer it (else: a 4xx)
    xargs: Any = None          # the vllm_xargs value sent (None: the field is left out)
    invalid_key: str | None = None  # the key a rejection must name (None: vllm_xargs itself)
    stop: list[str] | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    disconnect_after_chunks: int | None = None  # streaming: close after this many data chunks
    abandon_after_s: float | None = None        # non-streaming: give up after this long
    prompt_offset: int = 0     # where the prompt starts in the token source


@dataclass
class ServerRules:
    """What GET /v1/compaction/config says a request may ask for."""

    ratio: float
    methods: list[str]
    enabled: bool = True


def parse_rules(config_body: dict) -> ServerRules:
    config = config_body["config"]
    help_ = config_body.get("per_request", {}).get(KEY_METHOD, "")
    methods = [m.strip() for m in help_.removeprefix("one of ").split(",") if m.strip()]
    if not methods:
        from vllm_compact.core.request_overrides import METHODS

        methods = list(METHODS)
    return ServerRules(ratio=float(config["ratio"]), methods=methods, enabled=bool(config["enabled"]))


def valid_xargs(rng: random.Random, rules: ServerRules) -> dict:
    """One to three kv_compaction_* keys the server must accept (JSON numbers and booleans only: strings such as
    "20" or "true" are not part of the contract)."""
    out: dict = {}
    keys = rng.sample([KEY_RATIO, KEY_METHOD, KEY_ENABLED], rng.randint(1, 3))
    for key in keys:
        if key == KEY_RATIO:
            ratio = rng.choice([rules.ratio, rules.ratio * 1.5, rules.ratio * 2, max(rules.ratio, 20.0),
                                max(rules.ratio, 50.0)])
            out[key] = rng.choice([ratio, int(ratio) if float(ratio).is_integer() else ratio])
        elif key == KEY_METHOD:
            out[key] = rng.choice(rules.methods)
        else:
            out[key] = rng.choice([True, False, 1, 0] if rules.enabled else [False, 0])
    return out


# A value of the wrong type is refused whatever else the request asks; a ratio out of range only while the
# request leaves compaction on (turning it off is always allowed, and then the ratio is not checked against
# the server's).
_TYPE_INVALID = {
    KEY_RATIO: ["abc", "nan", "inf", "-inf", True, [10], ""],
    KEY_METHOD: ["bogus", "AM-HIGHEST-ATTENTION", 7, ""],
    KEY_ENABLED: ["maybe", 2, 0.5, ""],
}


def invalid_xargs(rng: random.Random, rules: ServerRules) -> tuple[Any, str | None]:
    """(a vllm_xargs value the server must reject, the kv_compaction key the rejection names or None)."""
    kind = rng.choice(["type", "type", "range", "unknown_key", "not_an_object"])
    if kind == "not_an_object":
        return rng.choice(["kv_compaction_ratio=20", [KEY_RATIO, 20]]), None
    base = valid_xargs(rng, rules)
    if kind == "unknown_key":
        key = rng.choice(["kv_compaction_ratios", "kv_compaction_foo", "kv_compaction_"])
        base[key] = 1
        return base, key
    if kind == "range":
        base.pop(KEY_ENABLED, None)
        ratios = [0.5, -3, 0, 5000, 1e300] + ([rules.ratio / 2] if rules.ratio / 2 >= 1 else [])
        base[KEY_RATIO] = rng.choice(ratios)
        return base, KEY_RATIO
    key = rng.choice(list(_TYPE_INVALID))
    base[key] = rng.choice(_TYPE_INVALID[key])
    return base, key


def make_specs(args: argparse.Namespace, rules: ServerRules, source_tokens: int) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    specs = []
    for i in range(args.requests):
        stream = rng.random() < args.stream_share
        draw = rng.random()
        overrides = ("valid" if draw < args.valid_override_share
                     else "invalid" if draw < args.valid_override_share + args.invalid_override_share else "none")
        spec = RequestSpec(
            index=i,
            endpoint="chat" if rng.random() < args.chat_share else "completions",
            stream=stream,
            include_usage=stream and rng.random() < 0.5,
            prompt_tokens=rng.randint(args.min_prompt, args.max_prompt),
            max_tokens=rng.randint(args.min_tokens, args.max_tokens),
            overrides=overrides,
            expect_valid=overrides != "invalid",
            temperature=rng.choice([0.0, 0.0, 0.8]),
        )
        spec.prompt_offset = rng.randrange(max(1, source_tokens - spec.prompt_tokens))
        style = rng.random()
        if style < 0.3:
            spec.ignore_eos = True
        elif style < 0.5:
            spec.stop = [rng.choice([".", "\n", " the"])]
        if overrides == "valid":
            spec.xargs = valid_xargs(rng, rules)
        elif overrides == "invalid":
            spec.xargs, spec.invalid_key = invalid_xargs(rng, rules)
        if overrides != "invalid" and rng.random() < args.disconnect_share:
            if stream:
                spec.disconnect_after_chunks = rng.randint(1, max(1, spec.max_tokens // 2))
            else:
                spec.abandon_after_s = rng.uniform(0.05, 3.0)
        specs.append(spec)
    return specs


def request_body(spec: RequestSpec, model: str, prompt: str) -> dict:
    body: dict = {"model": model, "max_tokens": spec.max_tokens, "temperature": spec.temperature,
                  "stream": spec.stream}
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt + "\n\nWhat is this text about?"}]
    else:
        body["prompt"] = prompt
    if spec.include_usage:
        body["stream_options"] = {"include_usage": True}
    if spec.stop:
        body["stop"] = spec.stop
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.xargs is not None:
        body["vllm_xargs"] = spec.xargs
    return body


# ---- what came back -------------------------------------------------------------------------------------------


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


# ---- the client -----------------------------------------------------------------------------------------------


async def send(client, base_url: str, spec: RequestSpec, body: dict, timeout: float) -> Outcome:
    import httpx

    path = "/v1/chat/completions" if spec.endpoint == "chat" else "/v1/completions"
    out = Outcome(spec.index)
    started = time.perf_counter()
    try:
        if spec.abandon_after_s is not None:
            try:
                reply = await asyncio.wait_for(client.post(base_url + path, json=body, timeout=timeout),
                                               spec.abandon_after_s)
            except asyncio.TimeoutError:
                out.outcome, out.detail = DISCONNECTED, f"abandoned after {spec.abandon_after_s:.2f} s"
                return out
            judge_json(spec, reply.status_code, _json_or_text(reply.content), out)
        elif not spec.stream:
            reply = await client.post(base_url + path, json=body, timeout=timeout)
            judge_json(spec, reply.status_code, _json_or_text(reply.content), out)
        else:
            async with client.stream("POST", base_url + path, json=body, timeout=timeout) as reply:
                if reply.status_code != 200:
                    judge_json(spec, reply.status_code, _json_or_text(await reply.aread()), out)
                    return out
                events, done = [], False
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    events.append(json.loads(data))
                    if spec.disconnect_after_chunks is not None and len(events) >= spec.disconnect_after_chunks:
                        out.chunks = len(events)
                        out.outcome, out.status = DISCONNECTED, 200
                        out.detail = f"closed after {len(events)} chunks"
                        return out  # leaving the block closes the connection mid-stream
            judge_stream(spec, events, done, out)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.outcome, out.detail = TRANSPORT_ERROR, f"{type(e).__name__}: {e}"[:300]
    finally:
        out.seconds = time.perf_counter() - started
    return out


def _json_or_text(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:300]


async def run_load(base_url: str, model: str, specs: list[RequestSpec], prompts: dict[int, str], concurrency: int,
                   timeout: float) -> list[Outcome]:
    import httpx
    from tqdm import tqdm

    queue: asyncio.Queue = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    outcomes: list[Outcome] = []
    tally: Counter = Counter()
    bar = tqdm(total=len(specs), desc="requests", file=sys.stderr)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_task(shared) -> None:
        while not queue.empty():
            spec = queue.get_nowait()
            body = request_body(spec, model, prompts[spec.index])
            if spec.abandon_after_s is not None or spec.disconnect_after_chunks is not None:
                # A connection of its own, closed with the request: the server sees the client go away.
                async with httpx.AsyncClient() as own:
                    out = await send(own, base_url, spec, body, timeout)
            else:
                out = await send(shared, base_url, spec, body, timeout)
            outcomes.append(out)
            tally[out.outcome] += 1
            tally["lost"] += is_lost(spec, out)
            bar.set_postfix(ok=tally[OK], rej=tally[REJECTED], err5xx=tally[SERVER_ERROR], lost=tally["lost"],
                            cut=tally[DISCONNECTED], refresh=False)
            bar.update(1)

    async with httpx.AsyncClient(limits=limits) as shared:
        await asyncio.gather(*(client_task(shared) for _ in range(concurrency)))
    bar.close()
    return outcomes


# ---- the server -----------------------------------------------------------------------------------------------


def _get_json(base_url: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    import httpx

    reply = httpx.get(base_url + path, timeout=timeout)
    return reply.status_code, _json_or_text(reply.content)


def _tiny_completion(base_url: str, model: str) -> bool:
    """One short uncompacted completion; True when it is answered in full."""
    import httpx

    try:
        reply = httpx.post(base_url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "vllm_xargs": {KEY_ENABLED: False}})
        body = reply.json()
        return reply.status_code == 200 and body["usage"]["completion_tokens"] == 2
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def idle_stats(base_url: str, model: str, timeout: float) -> dict | None:
    """The stats file once the engine is idle: nothing running and the free pages steady over 1 s.

    A tiny uncompacted request first makes the scheduler write the file again after everything before it has
    finished (the scheduler writes when a request finishes; an aborted request frees its pages with no step).
    """
    _tiny_completion(base_url, model)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, stats = _get_json(base_url, "/v1/compaction/stats")
        except Exception:  # noqa: BLE001 - the server may be gone; the caller reports it
            return None
        if status == 200 and stats["totals"]["running_requests"] == 0:
            free = stats.get("pool", {}).get("free_pages")
            if last is not None and free == last.get("pool", {}).get("free_pages"):
                return stats
            last = stats
        time.sleep(1.0)
    return last


def preemptions(metrics_text: str) -> int | None:
    """vLLM's preemption counter from a /metrics page (summed over its label sets), None when absent."""
    values = [float(line.rsplit(None, 1)[1]) for line in metrics_text.splitlines()
              if line.startswith("vllm:num_preemptions") and not line.startswith("vllm:num_preemptions_created")]
    return int(sum(values)) if values else None


def read_preemptions(base_url: str) -> int | None:
    import httpx

    try:
        return preemptions(httpx.get(base_url + "/metrics", timeout=10).text)
    except (httpx.HTTPError, ValueError, IndexError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    exe = shutil.which("vllm-compact", path=str(Path(sys.executable).parent)) or "vllm-compact"
    return [exe, "serve", args.model, "--host", "127.0.0.1", "--port", str(port), "--kv-compaction",
            "--kv-compaction-trigger", str(args.trigger), "--kv-compaction-recent-window", str(args.recent_window),
            *shlex.split(args.server_args)]


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str, list[str]]:
    import httpx

    port = _free_port()
    cmd = server_command(args, port)
    env = {**os.environ, "VLLM_COMPACT_FAULTS": f"rate={args.fault_rate},seed={args.fault_seed}",
           "HF_HUB_OFFLINE": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    print(f"starting the server (log: {log_path}): VLLM_COMPACT_FAULTS={env['VLLM_COMPACT_FAULTS']} "
          f"{shlex.join(cmd)}", file=sys.stderr)
    deadline = time.monotonic() + args.ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return process, base_url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop_server(process)
    raise RuntimeError(f"the server did not answer /health within {args.ready_timeout:.0f} s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


LOG_MARKERS = {
    "tracebacks": "Traceback (most recent call last)",
    "faults_raised": "InjectedFault: injected compaction fault",
    "non_finite_results": "FloatingPointError: ",
    "fallbacks_logged": "failed; falling back",
    "all_methods_failed": "RuntimeError: every compaction method failed",
    "kept_newest_keys": "keeping its newest keys",
    "engine_dead": "EngineDeadError",
    "http_500_lines": '" 500 ',
}


def log_counts(log_path: Path, upto: int | None = None) -> dict:
    """Markers in the server's log up to byte `upto` (where it stood before we stopped it: stopping the server
    kills its engine, and vLLM then logs an EngineDeadError of its own shutdown)."""
    data = log_path.read_bytes() if log_path.is_file() else b""
    text = data[:upto].decode(errors="replace")
    return {name: text.count(marker) for name, marker in LOG_MARKERS.items()}


# ---- the prompts ----------------------------------------------------------------------------------------------


def token_source(tokenizer, min_tokens: int) -> list[int]:
    """Token ids of English prose (the essays when the data is there, else seeded word salad)."""
    try:
        from vllm_compact.data.essays import essay_text

        text = essay_text()[:400_000]
    except Exception:  # noqa: BLE001 - no data on this machine: any text crosses the trigger as well
        rng = random.Random(0)
        words = "the of and to in is that it was for on are with as his they at be this from have or by".split()
        text = " ".join(rng.choice(words) for _ in range(4 * min_tokens))
    return tokenizer.encode(text, add_special_tokens=False)


# ---- report ---------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["# Reliability under load: a live compacting server, bad requests, disconnects, injected faults", "",
             f"Command: `{result['command']}`", ""]
    if result.get("server"):
        srv = result["server"]
        lines += [f"Server: `{srv['env']} {srv['command']}`", ""]
    if result.get("code", {}).get("commit"):
        modified = result["code"]["modified"]
        lines += [f"Code: commit {result['code']['commit'][:12]}"
                  + (f" with local changes to {', '.join(modified)}" if modified else "") + ".", ""]
    lines += [f"{result['settings']['requests']} requests from {result['settings']['concurrency']} concurrent "
              f"clients in {result['wall_s'] / 60:.1f} min.", "",
              "| requests | completed | rejected_4xx | errors_5xx | lost | disconnected | compactions | "
              "faults_injected | leaked_pages | server_alive |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
              f"| {s['requests']} | {s['completed']} | {s['rejected_4xx']} | {s['errors_5xx']} | {s['lost']} | "
              f"{s['disconnected']} | {s['compactions']} | {s['faults_injected']} ({_pct(s['fault_share'])}) | "
              f"{s['leaked_pages']} | {s['server_alive']} |", "",
              f"Free KV pages idle: {s['free_pages_start']} at the start, {s['free_pages_end']} at the end "
              f"(pool: {result['stats_end']['pool']['total_pages'] if result.get('stats_end') else '?'} pages). "
              f"Steps under memory pressure: {s.get('pressure_steps')}; preemptions (vLLM /metrics): "
              f"{s.get('preemptions')}. "
              f"Compactions that needed a fallback: {s['failures']}. Invalid requests sent: {s['invalid_sent']} "
              f"(accepted: {s['invalid_accepted']}; rejections naming the offending key in error.param: "
              f"{s['rejections_naming_the_key']} of {s['invalid_with_a_key']}). Answers whose usage.kv_compaction shows a compaction: "
              f"{s['answers_compacted']} of {s['answers_with_kv_usage']} that carry it.", "",
              *_log_line(result.get("server")),
              "Targets: " + ", ".join(f"{k}: **{'PASS' if v else 'FAIL'}**" for k, v in s["targets"].items()), "",
              "| endpoint | mode | overrides | completed | rejected | disconnected | lost | other |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for row in result["breakdown"]:
        other = {k: v for k, v in row.items()
                 if k not in ("endpoint", "mode", "overrides", OK, REJECTED, DISCONNECTED, "lost") and v}
        lines.append(f"| {row['endpoint']} | {row['mode']} | {row['overrides']} | {row.get(OK, 0)} | "
                     f"{row.get(REJECTED, 0)} | {row.get(DISCONNECTED, 0)} | {row.get('lost', 0)} | "
                     f"{', '.join(f'{k} {v}' for k, v in other.items()) or ''} |")
    if result["problems"]:
        lines += ["", "Requests that should have been answered and were not (first 20):", ""]
        lines += [f"- #{p['index']} {p['endpoint']} {p['mode']} {p['overrides']}: {p['outcome']} (HTTP {p['status']}) "
                  f"{p['detail']}" for p in result["problems"][:20]]
    return "\n".join(lines) + "\n"


def _log_line(server: dict | None) -> list[str]:
    counts = (server or {}).get("log_counts")
    if not counts:
        return []
    return [f"Server log until it was stopped: {counts['tracebacks']} tracebacks ({counts['faults_raised']} "
            f"injected raises, {counts['non_finite_results']} non-finite results (the injected NaN), "
            f"{counts['fallbacks_logged']} solves falling back to another method, "
            f"{counts['all_methods_failed']} batches where every method failed and "
            f"{counts['kept_newest_keys']} requests kept their newest keys), {counts['engine_dead']} EngineDeadError, "
            f"{counts['http_500_lines']} HTTP 500.", ""]


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}% of compactions"


def code_version() -> dict:
    """The commit this ran from, and the tracked files that differed from it (a shared working tree)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).resolve().parent).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def _trim(stats: dict | None) -> dict | None:
    return None if stats is None else {k: v for k, v in stats.items() if k != "requests"}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_compact.server.serve import resolve_model

    command = shlex.join(["vllm-compact", "bench", "reliability", *argv])
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    code = code_version()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    source = token_source(tokenizer, args.max_prompt)
    process, server_info = None, None
    started = time.perf_counter()
    if args.start_server:
        log_path = Path(args.server_log or out_path.with_name(out_path.stem + "_server.log"))
        process, base_url, cmd = start_server(args, log_path)
        server_info = {"command": shlex.join(["vllm-compact", *cmd[1:]]),
                       "env": f"VLLM_COMPACT_FAULTS=rate={args.fault_rate},seed={args.fault_seed}",
                       "log": str(log_path)}
    else:
        base_url = args.base_url.rstrip("/")
    try:
        _, models = _get_json(base_url, "/v1/models")
        served = models["data"][0]["id"]
        status, config_body = _get_json(base_url, "/v1/compaction/config")
        if status != 200 or not config_body["config"]["enabled"]:
            print("this server does not have compaction on (GET /v1/compaction/config)", file=sys.stderr)
            return 2
        rules = parse_rules(config_body)
        specs = make_specs(args, rules, len(source))
        prompts = {s.index: tokenizer.decode(source[s.prompt_offset:s.prompt_offset + s.prompt_tokens]) for s in specs}
        stats_start = idle_stats(base_url, served, args.idle_timeout)
        preempted_start = read_preemptions(base_url)
        load_started = time.perf_counter()
        outcomes = asyncio.run(run_load(base_url, served, specs, prompts, args.concurrency, args.request_timeout))
        load_s = time.perf_counter() - load_started
        stats_end = idle_stats(base_url, served, args.idle_timeout)
        preempted_end = read_preemptions(base_url)
        try:
            alive = _get_json(base_url, "/health")[0] == 200 and _tiny_completion(base_url, served)
        except Exception:  # noqa: BLE001 - a dead server is the finding
            alive = False
    finally:
        if process is not None:
            log_size = Path(server_info["log"]).stat().st_size
            stop_server(process)
    if server_info is not None:
        server_info["log_counts"] = log_counts(Path(server_info["log"]), upto=log_size)
        server_info["log_counts_at_stop"] = log_counts(Path(server_info["log"]))
    summary = summarise(specs, outcomes, stats_start, stats_end, alive)
    summary["preemptions"] = (None if preempted_start is None or preempted_end is None
                              else preempted_end - preempted_start)
    by_index = {o.index: o for o in outcomes}
    problems = [{"index": s.index, "endpoint": s.endpoint, "mode": "stream" if s.stream else "json",
                 "overrides": s.overrides, "xargs": s.xargs, **{k: v for k, v in asdict(by_index[s.index]).items()
                                                               if k != "index"}}
                for s in specs if s.index in by_index and is_lost(s, by_index[s.index])]
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    result = {
        "command": command,
        "code": code,
        "summary": summary,
        "settings": settings,
        "server": server_info,
        "base_url": base_url,
        "wall_s": time.perf_counter() - started,
        "load_s": load_s,
        "prompt_tokens": {"min": min(s.prompt_tokens for s in specs), "max": max(s.prompt_tokens for s in specs),
                          "mean": sum(s.prompt_tokens for s in specs) / len(specs)},
        "breakdown": breakdown(specs, outcomes),
        "problems": problems,
        "invalid_accepted": [{"index": s.index, "xargs": s.xargs} for s in specs
                             if not s.expect_valid and by_index[s.index].status == 200],
        "stats_start": _trim(stats_start),
        "stats_end": _trim(stats_end),
    }
    out_path.write_text(json.dumps(result, indent=1, default=str))
    out_path.with_suffix(".md").write_text(markdown(result))
    print(out_path.with_suffix(".md").read_text())
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
