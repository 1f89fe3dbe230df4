"""The compaction stats file: written by the scheduler (engine-core process), read by the API server process.

The engine core runs in another process than the HTTP server, so the scheduler publishes its counters as one small
JSON file (path in env VLLM_COMPACT_STATS_PATH, set by `vllm-compact serve`), replaced atomically, and the server
reads it for /metrics, /v1/compaction/stats and the per-response `usage.kv_compaction` field.

Under `vllm serve` on CPU the worker is a process of its own (vLLM's multiprocessing executor), so the worker
publishes its counters in a second file beside the first (`worker_stats_path`); `read_stats_file` puts them into
the payload's "worker" section. Without that file the section is the scheduler's own (in-process engines).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypedDict

STATS_PATH_ENV = "VLLM_COMPACT_STATS_PATH"

# Upper bounds (seconds) of the compaction-time histogram; one more count collects everything above the last.
SECONDS_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SchedulerStats(TypedDict):
    plans: int
    tokens_compacted: int
    pages_freed: int
    pressure_steps: int
    rollbacks: int  # plans undone because the worker did not report them written (the request kept its pages)
    lost_plans: int  # plans under memory pressure not reported written (the request was preempted, recomputed)


class SecondsHistogram(TypedDict):
    buckets: list[float]  # upper bounds, increasing
    counts: list[int]     # len(buckets) + 1; counts[i]: buckets[i-1] < s <= buckets[i]; the last: s > buckets[-1]


class WorkerStats(TypedDict):
    compactions: int
    failures: int
    heads_fitted: int
    heads_fell_back: int
    heads_evicted: int
    seconds_total: float
    seconds_hist: SecondsHistogram
    # Memory compaction holds outside the KV pool (its pages are counted by the pool): reference-query reservoirs of
    # requests that may still compact, compact segments' metadata (beta, positions); their sum now and its peak;
    # the largest transient buffer of a step (a solve's batch, a prefill chunk's page read).
    reservoir_bytes: int
    segment_bytes: int
    outside_pool_bytes: int
    outside_pool_bytes_peak: int
    workspace_bytes_peak: int
    # Compacted requests now: the pool bytes they hold, and the largest ratio of one's outside-pool bytes to them.
    compacted_requests: int
    compacted_pool_bytes: int
    outside_pool_ratio_max: float
    faults_injected: int   # test-only fault switch (core/faults.py); 0 in production


class Totals(TypedDict):
    logical_tokens: int   # over running requests
    physical_tokens: int  # KV slots those requests hold (compact pages counted whole)
    running_requests: int


class PoolStats(TypedDict):
    free_pages: int   # the KV block pool's free pages now (get_num_free_blocks); idle: total_pages - 1 (null page)
    total_pages: int  # pages in the pool


class RequestStats(TypedDict):
    logical_tokens: int
    physical_tokens: int
    compactions: int
    finished: bool  # True once the request finished or was aborted: its numbers are final


class StatsSnapshot(TypedDict):
    """What the scheduler provides at each write; the writer adds `updated` and `requests`."""

    config: dict
    scheduler: SchedulerStats
    worker: WorkerStats
    totals: Totals
    pool: PoolStats


class StatsPayload(StatsSnapshot):
    updated: float  # unix time of the write
    requests: dict[str, RequestStats]  # engine request id -> stats; running plus recently finished ones


def seconds_histogram(seconds: Iterable[float]) -> SecondsHistogram:
    counts = [0] * (len(SECONDS_BUCKETS) + 1)
    for s in seconds:
        counts[bisect_left(SECONDS_BUCKETS, s)] += 1
    return {"buckets": list(SECONDS_BUCKETS), "counts": counts}


def worker_stats_path(stats_path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(stats_path)}.worker.json")


def worker_stats(compactions: int, failures: int, heads_fell_back: int, seconds: Iterable[float],
                 heads_fitted: int = 0, heads_evicted: int = 0, reservoir_bytes: int = 0, segment_bytes: int = 0, outside_pool_bytes_peak: int = 0,
                 workspace_bytes_peak: int = 0, compacted_requests: int = 0, compacted_pool_bytes: int = 0,
                 outside_pool_ratio_max: float = 0.0, faults_injected: int = 0) -> WorkerStats:
    seconds = list(seconds)
    outside = reservoir_bytes + segment_bytes
    return WorkerStats(compactions=compactions, failures=failures, heads_fitted=heads_fitted,
                       heads_fell_back=heads_fell_back, heads_evicted=heads_evicted,
                       seconds_total=float(sum(seconds)), seconds_hist=seconds_histogram(seconds),
                       reservoir_bytes=reservoir_bytes, segment_bytes=segment_bytes, outside_pool_bytes=outside,
                       outside_pool_bytes_peak=max(outside_pool_bytes_peak, outside),
                       workspace_bytes_peak=workspace_bytes_peak, compacted_requests=compacted_requests,
                       compacted_pool_bytes=compacted_pool_bytes, outside_pool_ratio_max=outside_pool_ratio_max,
                       faults_injected=faults_injected)


def _write_json_atomically(path: str | os.PathLike, value: dict) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, separators=(",", ":"))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_stats_file(path: str | os.PathLike, payload: StatsPayload) -> None:
    """Replace the file in one step: a reader sees the old or the new content, never a partial one."""
    _write_json_atomically(path, payload)


def write_worker_stats_file(stats_path: str | os.PathLike, stats: WorkerStats) -> None:
    _write_json_atomically(worker_stats_path(stats_path), stats)


def _read_json(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a vllm-compact stats file")
    return value


def read_stats_file(path: str | os.PathLike) -> StatsPayload | None:
    """The last payload written (with the worker's own file, if any, as its "worker" section), or None while the
    scheduler has not written one yet. Raises ValueError on a corrupt file."""
    payload = _read_json(Path(path))
    if payload is None:
        return None
    if "updated" not in payload:
        raise ValueError(f"{path} is not a vllm-compact stats file")
    worker = _read_json(worker_stats_path(path))
    if worker is not None:
        payload["worker"] = worker
    return payload


class StatsFileWriter:
    """Keeps the per-request table and writes the file at most every `min_interval_s`, or at once when forced.

    The scheduler calls `track_request` for running requests, `finish_request` when one finishes or is aborted
    (before its pages are released, so its final lengths are recorded), and `maybe_write` once per step with
    force=True when the step planned a compaction. A finish not yet on disk also forces the next write: the API
    server waits for a request's final numbers before it answers, and the file must show the idle state once
    the last request is gone.
    """

    def __init__(self, path: str | os.PathLike, min_interval_s: float = 0.5, max_finished: int = 512) -> None:
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self.max_finished = max_finished
        self._running: dict[str, RequestStats] = {}
        self._finished: OrderedDict[str, RequestStats] = OrderedDict()
        self._last_write = 0.0
        self._unwritten_finish = False

    @classmethod
    def from_env(cls) -> StatsFileWriter | None:
        path = os.environ.get(STATS_PATH_ENV)
        return cls(path) if path else None

    def track_request(self, req_id: str, logical_tokens: int, physical_tokens: int, compactions: int) -> None:
        self._running[req_id] = RequestStats(
            logical_tokens=logical_tokens, physical_tokens=physical_tokens, compactions=compactions, finished=False
        )

    def finish_request(self, req_id: str, logical_tokens: int, physical_tokens: int, compactions: int) -> None:
        self._running.pop(req_id, None)
        self._finished[req_id] = RequestStats(
            logical_tokens=logical_tokens, physical_tokens=physical_tokens, compactions=compactions, finished=True
        )
        while len(self._finished) > self.max_finished:
            self._finished.popitem(last=False)
        self._unwritten_finish = True

    def forget_request(self, req_id: str) -> None:
        """For a request leaving the running set without finishing (preempted: it comes back later)."""
        self._running.pop(req_id, None)

    def maybe_write(self, snapshot: Callable[[], StatsSnapshot], force: bool = False) -> bool:
        now = time.time()
        if not (force or self._unwritten_finish) and now - self._last_write < self.min_interval_s:
            return False
        payload = StatsPayload(**snapshot(), updated=now, requests={**self._finished, **self._running})
        write_stats_file(self.path, payload)
        self._last_write = now
        self._unwritten_finish = False
        return True


class WorkerStatsFileWriter:
    """The worker's counters in their own file (the worker may be another process than the scheduler).

    Call `maybe_write` after every step that executed compaction plans (force=True) and after steps that dropped
    finished requests (their reservoirs). Only the worker of rank 0 writes: under tensor parallelism every rank
    runs the same plans.
    """

    def __init__(self, stats_path: str | os.PathLike, min_interval_s: float = 0.5) -> None:
        self.stats_path = stats_path
        self.min_interval_s = min_interval_s
        self._last_write = 0.0

    @classmethod
    def from_env(cls, rank: int) -> WorkerStatsFileWriter | None:
        path = os.environ.get(STATS_PATH_ENV)
        return cls(path) if path and rank == 0 else None

    def maybe_write(self, stats: Callable[[], WorkerStats], force: bool = False) -> bool:
        now = time.time()
        if not force and now - self._last_write < self.min_interval_s:
            return False
        write_worker_stats_file(self.stats_path, stats())
        self._last_write = now
        return True
