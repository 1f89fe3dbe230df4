"""Hypothesis profiles: `default` is derandomised so CI reruns exactly the examples a developer ran; set
HYPOTHESIS_PROFILE=explore for fresh random examples on every run (loop it after touching a property-tested path)."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
