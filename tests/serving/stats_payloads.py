"""Stats-file contents for tests, in the exact format of vllm_compact.core.stats_file."""

from __future__ import annotations

from vllm_compact.core.stats_file import StatsPayload, StatsSnapshot, seconds_histogram


def snapshot(compactions: int = 0, seconds: tuple[float, ...] = (), physical: int = 0, logical: int = 0) -> StatsSnapshot:
    return {
        "config": {"enabled": True, "ratio": 8.0},
        "scheduler": {"plans": compactions, "tokens_compacted": 64 * compactions, "pages_freed": 2 * compactions,
                      "pressure_steps": 0},
        "worker": {"compactions": compactions, "failures": 0, "heads_fell_back": 0, "seconds_total": sum(seconds),
                   "seconds_hist": seconds_histogram(seconds), "reservoir_bytes": 4096,
                   "segment_bytes": 8192, "outside_pool_bytes": 12288, "outside_pool_bytes_peak": 12288,
                   "workspace_bytes_peak": 65536, "compacted_requests": 1, "compacted_pool_bytes": 49152,
                   "outside_pool_ratio_max": 0.25, "faults_injected": 0},
        "totals": {"logical_tokens": logical, "physical_tokens": physical, "running_requests": 1 if logical else 0},
        "pool": {"free_pages": 99, "total_pages": 100},
    }


def payload(requests: dict, **kwargs) -> StatsPayload:
    return {**snapshot(**kwargs), "updated": 1.0, "requests": requests}


def request(logical: int, physical: int, compactions: int, finished: bool = True) -> dict:
    return {"logical_tokens": logical, "physical_tokens": physical, "compactions": compactions, "finished": finished}
