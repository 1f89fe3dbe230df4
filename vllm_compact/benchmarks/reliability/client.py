"""The load: concurrent clients sending the specs over HTTP, streaming or not, disconnecting on purpose."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

from vllm_compact.benchmarks.reliability.outcomes import (
    DISCONNECTED,
    OK,
    REJECTED,
    SERVER_ERROR,
    TRANSPORT_ERROR,
    Outcome,
    is_lost,
    judge_json,
    judge_stream,
)
from vllm_compact.benchmarks.reliability.request_specs import RequestSpec, request_body


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
            judge_json(spec, reply.status_code, json_or_text(reply.content), out)
        elif not spec.stream:
            reply = await client.post(base_url + path, json=body, timeout=timeout)
            judge_json(spec, reply.status_code, json_or_text(reply.content), out)
        else:
            async with client.stream("POST", base_url + path, json=body, timeout=timeout) as reply:
                if reply.status_code != 200:
                    judge_json(spec, reply.status_code, json_or_text(await reply.aread()), out)
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


def json_or_text(content: bytes) -> Any:
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
