"""The stats file format: atomic writes, reads, the histogram, the writer's request table and throttling."""

from __future__ import annotations

import json
import threading

import pytest

from vllm_compact.core.stats_file import (
    SECONDS_BUCKETS,
    StatsFileWriter,
    WorkerStatsFileWriter,
    read_stats_file,
    seconds_histogram,
    worker_stats,
    worker_stats_path,
    write_stats_file,
)
from tests.serving.stats_payloads import snapshot


def test_missing_file_reads_as_none(tmp_path):
    assert read_stats_file(tmp_path / "nope.json") is None


def test_write_then_read_round_trips(tmp_path):
    payload = {**snapshot(), "updated": 123.5, "requests": {"r1": {"logical_tokens": 9, "physical_tokens": 4,
                                                                   "compactions": 1, "finished": True}}}
    write_stats_file(tmp_path / "s.json", payload)
    assert read_stats_file(tmp_path / "s.json") == payload
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary left behind


def test_corrupt_file_is_an_error(tmp_path):
    (tmp_path / "s.json").write_text('{"no": "updated"}')
    with pytest.raises(ValueError, match="not a vllm-compact stats file"):
        read_stats_file(tmp_path / "s.json")


def test_readers_never_see_a_partial_file(tmp_path):
    path = tmp_path / "s.json"
    big = {f"r{i}": {"logical_tokens": i, "physical_tokens": i, "compactions": 0, "finished": False} for i in range(1500)}
    stop = threading.Event()
    errors: list[Exception] = []

    def reader():
        while not stop.is_set():
            try:
                got = read_stats_file(path)
                assert got is None or len(got["requests"]) == 1500
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(25):
        write_stats_file(path, {**snapshot(), "updated": float(i), "requests": big})
    stop.set()
    thread.join()
    assert errors == []


def test_histogram_counts_each_observation_in_its_le_bucket():
    hist = seconds_histogram([0.0005, 0.001, 0.0011, 0.3, 99.0])
    assert hist["buckets"] == list(SECONDS_BUCKETS)
    expected = [0] * (len(SECONDS_BUCKETS) + 1)
    expected[0] = 2  # 0.0005 and 0.001 (le 0.001)
    expected[SECONDS_BUCKETS.index(0.0025)] = 1
    expected[SECONDS_BUCKETS.index(0.5)] = 1
    expected[-1] = 1  # above the last bound
    assert hist["counts"] == expected


def test_writer_throttles_unless_forced_and_keeps_finished_requests(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("vllm_compact.core.stats_file.time.time", lambda: clock[0])
    writer = StatsFileWriter(tmp_path / "s.json", min_interval_s=0.5, max_finished=2)
    writer.track_request("a", 100, 100, 0)
    assert writer.maybe_write(snapshot)
    clock[0] += 0.1
    writer.track_request("a", 200, 60, 1)
    assert not writer.maybe_write(snapshot)  # throttled
    assert read_stats_file(tmp_path / "s.json")["requests"]["a"]["logical_tokens"] == 100
    writer.finish_request("a", 201, 61, 1)
    assert writer.maybe_write(snapshot, force=True)
    got = read_stats_file(tmp_path / "s.json")
    assert got["updated"] == 1000.1
    assert got["requests"]["a"] == {"logical_tokens": 201, "physical_tokens": 61, "compactions": 1, "finished": True}
    for name in ("b", "c"):
        writer.track_request(name, 5, 5, 0)
        writer.finish_request(name, 6, 6, 0)
    writer.track_request("preempted", 7, 7, 0)
    writer.forget_request("preempted")
    clock[0] += 1.0
    assert writer.maybe_write(snapshot)
    got = read_stats_file(tmp_path / "s.json")
    assert sorted(got["requests"]) == ["b", "c"]  # the oldest finished one fell out; the preempted one is gone
    assert json.loads((tmp_path / "s.json").read_text())["totals"] == snapshot()["totals"]


def test_writer_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_COMPACT_STATS_PATH", raising=False)
    assert StatsFileWriter.from_env() is None
    monkeypatch.setenv("VLLM_COMPACT_STATS_PATH", str(tmp_path / "x.json"))
    assert StatsFileWriter.from_env().path == tmp_path / "x.json"


def test_an_unwritten_finish_forces_the_next_write(tmp_path, monkeypatch):
    clock = [50.0]
    monkeypatch.setattr("vllm_compact.core.stats_file.time.time", lambda: clock[0])
    writer = StatsFileWriter(tmp_path / "s.json", min_interval_s=0.5)
    writer.track_request("a", 10, 10, 0)
    assert writer.maybe_write(snapshot)
    clock[0] += 0.01
    writer.finish_request("a", 11, 11, 0)
    assert writer.maybe_write(snapshot)  # within the interval, but a finish is pending
    assert read_stats_file(tmp_path / "s.json")["requests"]["a"]["finished"] is True
    clock[0] += 0.01
    assert not writer.maybe_write(snapshot)  # nothing pending any more


def test_the_worker_file_becomes_the_worker_section(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    write_stats_file(path, {**snapshot(), "updated": 1.0, "requests": {}})
    assert read_stats_file(path)["worker"]["compactions"] == 0
    monkeypatch.setenv("VLLM_COMPACT_STATS_PATH", str(path))
    assert WorkerStatsFileWriter.from_env(rank=1) is None  # only rank 0 writes
    writer = WorkerStatsFileWriter.from_env(rank=0)
    stats = worker_stats(compactions=2, failures=1, heads_fell_back=3, seconds=[0.02, 0.3], reservoir_bytes=512,
                         segment_bytes=2048)
    assert writer.maybe_write(lambda: stats)
    assert not writer.maybe_write(lambda: stats)  # throttled
    assert writer.maybe_write(lambda: {**stats, "compactions": 3}, force=True)
    assert worker_stats_path(path).is_file()
    got = read_stats_file(path)["worker"]
    assert got == {**stats, "compactions": 3}
    assert got["seconds_total"] == pytest.approx(0.32)
    assert sum(got["seconds_hist"]["counts"]) == 2


def test_the_workers_counters_convert_as_they_are():
    """The contract with the worker: `worker_stats(**asdict(state.stats))`."""
    from dataclasses import asdict

    from vllm_compact.core.stats import WorkerCompactionStats

    counters = WorkerCompactionStats(compactions=4, failures=1, heads_fell_back=2, seconds=[0.5, 0.25],
                                     workspace_bytes_peak=64, outside_pool_bytes_peak=4096)
    got = worker_stats(**asdict(counters), reservoir_bytes=1024, segment_bytes=512)
    assert (got["compactions"], got["failures"], got["heads_fell_back"], got["workspace_bytes_peak"]) == (4, 1, 2, 64)
    assert (got["outside_pool_bytes"], got["outside_pool_bytes_peak"]) == (1536, 4096)
    assert got["seconds_total"] == 0.75 and sum(got["seconds_hist"]["counts"]) == 2
