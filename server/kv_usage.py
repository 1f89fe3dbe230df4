"""Reading the scheduler's stats file in the API server: cached reads, and a response's KV lengths.

An OpenAI response id maps to the engine's request ids like this in vLLM 0.32 (the engine adds 8 random hex
characters to every id unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set; n > 1 adds a "<k>_" prefix per choice):
    completions       cmpl-U      -> [k_]cmpl-U-<prompt index>-xxxxxxxx
    chat completions  chatcmpl-U  -> [k_]chatcmpl-U-xxxxxxxx   (several prompts: chatcmpl-U_<i>-xxxxxxxx)
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from typing import TypedDict

from vllm_compact.core.stats_file import RequestStats, StatsPayload, read_stats_file, worker_stats_path

# How long a finished response waits for the scheduler's file to show its requests as finished (the scheduler
# writes at once when a request finishes, so this is normally one short poll).
FINAL_STATS_WAIT_S = 1.0
_POLL_S = 0.02


class KVUsage(TypedDict):
    """`usage.kv_compaction` of a response: sums over its engine requests (one per choice and prompt)."""

    logical_tokens: int
    physical_tokens: int
    compactions: int


class StatsReader:
    """Reads the stats file, parsing it again only when it was replaced."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._key: tuple | None = None
        self._payload: StatsPayload | None = None

    def read(self) -> StatsPayload | None:
        if not self.path:
            return None
        key = (_identity(self.path), _identity(worker_stats_path(self.path)))
        if key[0] is None:
            return None
        if key != self._key:
            self._payload = read_stats_file(self.path)
            self._key = key
        return self._payload


def _identity(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """Changes whenever the file is replaced (atomic writes make a new inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def engine_ids_pattern(response_id: str) -> re.Pattern[str]:
    return re.compile(rf"(?:\d+_)?{re.escape(response_id)}(?:[-_]\d+)?(?:-[0-9a-f]{{8}})?")


def matching_requests(payload: StatsPayload, response_id: str) -> list[RequestStats]:
    pattern = engine_ids_pattern(response_id)
    return [stats for req_id, stats in payload.get("requests", {}).items() if pattern.fullmatch(req_id)]


def summed(entries: list[RequestStats]) -> KVUsage:
    return KVUsage(
        logical_tokens=sum(e["logical_tokens"] for e in entries),
        physical_tokens=sum(e["physical_tokens"] for e in entries),
        compactions=sum(e["compactions"] for e in entries),
    )


@dataclass
class ResponseShape:
    """How many engine requests one OpenAI request becomes."""

    engine_requests: int

    @classmethod
    def of(cls, body: dict, counts_prompts: bool) -> ResponseShape | None:
        """`counts_prompts`: /v1/completions takes a list of prompts, one engine request each (per choice).
        None when the ids cannot be matched (beam search runs under other ids)."""
        if body.get("use_beam_search"):
            return None
        n = body.get("n") or 1
        if not isinstance(n, int) or n < 1:
            return None
        prompts = _prompt_count(body.get("prompt")) if counts_prompts else 1
        return cls(engine_requests=n * prompts)


def _prompt_count(prompt) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list, dict)):
        return len(prompt)
    return 1


async def final_usage(reader: StatsReader, response_id: str, shape: ResponseShape) -> KVUsage | None:
    """The response's KV lengths once every one of its engine requests shows as finished in the stats file.

    None when there is no stats file, or the requests do not all show up finished within FINAL_STATS_WAIT_S (the
    field is then left out rather than reported wrong).
    """
    deadline = time.monotonic() + FINAL_STATS_WAIT_S
    while True:
        payload = reader.read()
        if payload is None:
            return None
        entries = matching_requests(payload, response_id)
        if len(entries) >= shape.engine_requests and all(e["finished"] for e in entries):
            return summed(entries)
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(_POLL_S)
