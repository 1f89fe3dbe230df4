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
    heads_fell_back: int = 0
    seconds: list[float] = field(default_factory=list)
    faults_injected: int = 0  # test-only fault switch (core/faults.py)
    workspace_bytes_peak: int = 0  # the largest transient buffer of one step (a solve's batch, a prefill read)
    outside_pool_bytes_peak: int = 0

    def note_workspace(self, nbytes: int) -> None:
        self.workspace_bytes_peak = max(self.workspace_bytes_peak, nbytes)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["seconds_total"] = sum(self.seconds)
        del d["seconds"]
        return d
