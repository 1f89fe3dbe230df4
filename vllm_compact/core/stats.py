"""Counters of compaction work, kept where the work happens (scheduler process, worker process)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SchedulerCompactionStats:
    plans: int = 0
    tokens_compacted: int = 0
    pages_freed: int = 0
    pressure_steps: int = 0
    rollbacks: int = 0  # plans the worker could not carry out: the request kept its pages

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
    reservoir_bytes: int = 0
    faults_injected: int = 0  # test-only fault switch (core/faults.py)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["seconds_total"] = sum(self.seconds)
        del d["seconds"]
        return d
