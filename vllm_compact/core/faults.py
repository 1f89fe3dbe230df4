"""A test-only switch that makes compactions fail, to prove that no failure can lose KV or stop the engine.

`VLLM_COMPACT_FAULTS="rate=0.2,seed=0"`: each solve raises (half the faults) or returns NaN values (the other half)
with probability `rate`. `sites=solve+gather+write` (default `solve`) also makes reading the source pages and
writing the compact pages (after the first layer) raise with that probability. A plan that fails every attempt is
undone (the request keeps its uncompacted pages) or, under memory pressure, redone as a copy of the span's newest
keys, which is never faulted. Unset (always, outside tests and `bench reliability`), it does nothing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

FAULTS_ENV = "VLLM_COMPACT_FAULTS"
SITES = frozenset({"solve", "gather", "write"})


class InjectedFault(RuntimeError):
    """Raised by an injected fault."""


class FaultInjector:
    def __init__(self, rate: float = 0.0, seed: int = 0, sites: frozenset[str] = frozenset({"solve"})) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{FAULTS_ENV}: rate must lie in [0, 1], got {rate}")
        if not sites <= SITES:
            raise ValueError(f"{FAULTS_ENV}: sites must be among {sorted(SITES)}, got {sorted(sites)}")
        self.rate = rate
        self.sites = sites
        self.rng = random.Random(seed)
        self.injected = 0

    @classmethod
    def from_env(cls) -> FaultInjector:
        raw = os.environ.get(FAULTS_ENV, "")
        if not raw:
            return cls()
        fields = dict(part.split("=", 1) for part in raw.split(",") if part)
        sites = frozenset(fields.get("sites", "solve").split("+"))
        return cls(rate=float(fields.get("rate", 0.0)), seed=int(fields.get("seed", 0)), sites=sites)

    def _strikes(self, site: str) -> bool:
        return site in self.sites and self.rate > 0.0 and self.rng.random() < self.rate

    def check(self, site: str) -> None:
        """Raise an injected fault at `site` ("gather" or "write") with probability `rate`."""
        if self._strikes(site):
            self.injected += 1
            raise InjectedFault(f"injected {site} fault")

    def solve(self, solve: Callable, *args, **kwargs):
        """solve(*args, **kwargs), or a fault."""
        if not self._strikes("solve"):
            return solve(*args, **kwargs)
        self.injected += 1
        if self.rng.random() < 0.5:
            raise InjectedFault("injected compaction fault")
        result = solve(*args, **kwargs)
        result.values.fill_(float("nan"))
        return result
