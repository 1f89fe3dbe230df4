"""A test-only switch that makes compaction solves fail, to prove that no failure can lose KV or stop the engine.

`VLLM_COMPACT_FAULTS="rate=0.2,seed=0"`: each solve raises (half the faults) or returns NaN values (the other half)
with probability `rate`. Unset (always, outside tests and `bench reliability`), it does nothing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

FAULTS_ENV = "VLLM_COMPACT_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by an injected fault."""


class FaultInjector:
    def __init__(self, rate: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{FAULTS_ENV}: rate must lie in [0, 1], got {rate}")
        self.rate = rate
        self.rng = random.Random(seed)
        self.injected = 0

    @classmethod
    def from_env(cls) -> FaultInjector:
        raw = os.environ.get(FAULTS_ENV, "")
        if not raw:
            return cls()
        fields = dict(part.split("=", 1) for part in raw.split(",") if part)
        return cls(rate=float(fields.get("rate", 0.0)), seed=int(fields.get("seed", 0)))

    def solve(self, solve: Callable, *args, **kwargs):
        """solve(*args, **kwargs), or a fault."""
        if self.rate == 0.0 or self.rng.random() >= self.rate:
            return solve(*args, **kwargs)
        self.injected += 1
        if self.rng.random() < 0.5:
            raise InjectedFault("injected compaction fault")
        result = solve(*args, **kwargs)
        result.values.fill_(float("nan"))
        return result
