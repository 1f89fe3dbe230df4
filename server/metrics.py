"""Compaction metrics on vLLM's /metrics: a prometheus_client Collector that reads the scheduler's stats file.

vLLM serves /metrics from prometheus_client's default registry when it runs one API server (the default), so
registering there is enough. With several API servers vLLM switches to a multiprocess registry built per scrape,
which this collector is not part of; /v1/compaction/stats still works then.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from vllm_compact.core.stats_file import SECONDS_BUCKETS, StatsPayload
from vllm_compact.server.kv_usage import StatsReader

logger = logging.getLogger("vllm_compact")
PREFIX = "vllm_compact"

# (metric name without prefix, section of the stats file, key, help)
COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("compactions", "worker", "compactions", "Compactions executed (one per request and plan)."),
    ("failures", "worker", "failures", "Compactions that failed (the request kept its full KV)."),
    ("heads_fitted", "worker", "heads_fitted", "KV heads (per layer, per compaction) whose entries the AM fit made."),
    ("heads_fell_back", "worker", "heads_fell_back",
     "KV heads whose AM fit the guard replaced by plain eviction (it did worse on held-out queries, or broke)."),
    ("heads_evicted", "worker", "heads_evicted", "KV heads compacted by an eviction method (snapkv, recent, ...)."),
    ("tokens_compacted", "scheduler", "tokens_compacted", "Tokens replaced by compact segments."),
    ("pages_freed", "scheduler", "pages_freed", "KV pages returned to the pool by compaction."),
    ("plans", "scheduler", "plans", "Compaction plans made by the scheduler."),
    ("pressure_steps", "scheduler", "pressure_steps", "Scheduler steps that compacted under memory pressure."),
    ("rollbacks", "scheduler", "rollbacks", "Plans undone because the worker did not report them written."),
    ("lost_plans", "scheduler", "lost_plans",
     "Plans under memory pressure the worker did not report written: the request was preempted and recomputed."),
)
GAUGES: tuple[tuple[str, str, str, str], ...] = (
    ("logical_tokens", "totals", "logical_tokens", "Logical KV length summed over running requests."),
    ("physical_tokens", "totals", "physical_tokens", "KV slots held by running requests (after compaction)."),
    ("running_requests", "totals", "running_requests", "Requests running in the engine."),
    ("reservoir_bytes", "worker", "reservoir_bytes",
     "Memory of the reference-query reservoirs (requests that may still compact)."),
    ("segment_bytes", "worker", "segment_bytes", "Metadata of compact segments (beta, positions) outside the pool."),
    ("outside_pool_bytes", "worker", "outside_pool_bytes", "All memory compaction holds outside the KV pool now."),
    ("outside_pool_bytes_peak", "worker", "outside_pool_bytes_peak",
     "Peak of outside_pool_bytes since the server started."),
    ("workspace_bytes_peak", "worker", "workspace_bytes_peak",
     "Largest transient buffer of one step (a solve's batch, a compacted prefill chunk's page read)."),
    ("compacted_pool_bytes", "worker", "compacted_pool_bytes", "KV pool bytes held by compacted requests now."),
    ("outside_pool_ratio_max", "worker", "outside_pool_ratio_max",
     "Largest ratio, over compacted requests now, of the memory one holds outside the pool to its pool pages."),
)


class CompactionCollector(Collector):
    def __init__(self, reader: StatsReader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[Metric]:
        try:
            payload = self.reader.read()
        except ValueError:  # a corrupt file must not break vLLM's own metrics
            logger.warning("vllm-compact: unreadable stats file %s", self.reader.path)
            payload = None
        yield from metrics_of(payload)


def _value(payload: StatsPayload | None, section: str, key: str) -> float:
    if payload is None:
        return 0.0
    return float(payload.get(section, {}).get(key, 0))


def metrics_of(payload: StatsPayload | None) -> Iterator[Metric]:
    """The metric families for one stats payload (all zero before the first file is written)."""
    for name, section, key, doc in COUNTERS:
        yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=_value(payload, section, key))
    for name, section, key, doc in GAUGES:
        yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=_value(payload, section, key))
    yield _seconds_histogram(payload)


def _seconds_histogram(payload: StatsPayload | None) -> HistogramMetricFamily:
    worker = payload.get("worker", {}) if payload else {}
    hist = worker.get("seconds_hist") or {"buckets": list(SECONDS_BUCKETS), "counts": [0] * (len(SECONDS_BUCKETS) + 1)}
    cumulative = list(accumulate(hist["counts"]))
    bounds = [*(str(float(b)) for b in hist["buckets"]), "+Inf"]
    return HistogramMetricFamily(
        f"{PREFIX}_compaction_seconds",
        "Wall time of one compaction (all layers and heads of one request's plan).",
        buckets=list(zip(bounds, cumulative)),
        sum_value=float(worker.get("seconds_total", 0.0)),
    )


_REGISTERED: set[int] = set()


def register_collector(reader: StatsReader, registry: CollectorRegistry = REGISTRY) -> None:
    """Once per registry and process."""
    if id(registry) in _REGISTERED:
        return
    registry.register(CompactionCollector(reader))
    _REGISTERED.add(id(registry))
