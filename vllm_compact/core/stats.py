"""Counters of compaction work, kept where the work happens (scheduler process, worker process)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SchedulerCompactionStats:
    plans: int = 0
    tokens_compacted: int = 0
    pages_freed: int = 0
    pressure_steps: int = 0
    rollbacks: int = 0  # plans the worker did not report written: the request kept its pages
    lost_plans: int = 0  # plans under memory pressure not reported written: the request was preempted (recomputed)

    def record_written(self, tokens: int, pages_freed: int) -> None:
        self.tokens_compacted += tokens
        self.pages_freed += pages_freed

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class WorkerCompactionStats:
    compactions: int = 0
    failures: int = 0
    # Per (layer, KV head) of every compaction: entries fitted by AM (keys, beta, and values with refit_values), AM
    # fits its guard replaced by plain eviction of the same keys (or SnapKV's), heads compacted by an eviction method.
    heads_fitted: int = 0
    heads_fell_back: int = 0
    heads_evicted: int = 0
    seconds: list[float] = field(default_factory=list)
    faults_injected: int = 0  # test-only fault switch (core/faults.py)
    workspace_bytes_peak: int = 0  # the largest transient buffer of one step (a solve's batch, a prefill read)
    outside_pool_bytes_peak: int = 0

    def count_heads(self, fell_back, fitted: bool) -> None:
        """One solve's heads: `fell_back` [H] bool from the method, `fitted` whether the method fits (AM)."""
        fell = int(fell_back.sum())
        if fitted:
            self.heads_fitted += len(fell_back) - fell
            self.heads_fell_back += fell
        else:
            self.heads_evicted += len(fell_back)

    def note_workspace(self, nbytes: int) -> None:
        self.workspace_bytes_peak = max(self.workspace_bytes_peak, nbytes)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["seconds_total"] = sum(self.seconds)
        del d["seconds"]
        return d
