"""The test-only fault switch: which sites it strikes, how often, and what it refuses."""

from __future__ import annotations

import pytest

from vllm_compact.core.faults import FAULTS_ENV, FaultInjector, InjectedFault


def test_unset_never_strikes(monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    faults = FaultInjector.from_env()
    for _ in range(100):
        faults.check("gather")
        faults.check("write")
        assert faults.solve(lambda: 1) == 1
    assert faults.injected == 0


def test_sites_strike_at_their_rate_and_only_where_asked(monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, "rate=0.5,seed=3,sites=gather+write")
    faults = FaultInjector.from_env()
    assert faults.sites == {"gather", "write"}
    raised = 0
    for _ in range(400):
        try:
            faults.check("gather")
        except InjectedFault:
            raised += 1
    assert 150 < raised < 250 and faults.injected == raised
    assert all(faults.solve(lambda: 7) == 7 for _ in range(50))  # solve is not among the sites


@pytest.mark.parametrize("raw", ["rate=1.5", "rate=0.1,sites=solve+disk"])
def test_bad_settings_are_refused(monkeypatch, raw):
    monkeypatch.setenv(FAULTS_ENV, raw)
    with pytest.raises(ValueError, match=FAULTS_ENV):
        FaultInjector.from_env()
