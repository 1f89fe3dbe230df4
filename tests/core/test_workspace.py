"""The compaction workspace: its per-head estimate against a real solve's measured memory, and the compactor's
solves kept within `workspace_mib` without changing any segment."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import vllm_compact.core.compactor as compactor_module
from tests.core.test_compactor_step_order import HELD, KV_HEADS, LAYERS, PRESSURE_STEP, WITH_QUERIES, _compactor, _segment
from vllm_compact.core.plan import CompactionStep
from vllm_compact.core.workspace import SOLVE_FIXED_BYTES, MiB, head_solve_bytes

# A fresh interpreter samples its resident memory during one served-default AM solve of 12 heads (bf16, the
# 4-layers-per-step shape at 3000 tokens, 10x): what the step really allocates, allocator included.
_MEASURE = r"""
import json, os, threading, time, torch
from vllm_compact.am import HeadBatch
from vllm_compact.am.methods import get_method
from vllm_compact.config import CompactionConfig
torch.manual_seed(0)
heads, keys, queries, budget, dim = 12, 3000, 768, 300, 64
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def batch(h):
    k = (torch.randn(h, keys, dim) * 2).bfloat16()
    return HeadBatch(keys=k, values=torch.randn(h, keys, dim).bfloat16(), queries=(torch.randn(h, queries, dim) * 2).bfloat16(),
                     scale=0.125, budget=torch.full((h,), budget), content_keys=k.clone())
config = CompactionConfig(enabled=True)
method = get_method(config.method, **config.method_options(config.method))
method.compact(batch(1))  # libraries and the allocator warmed on one head
big = batch(heads)
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
method.compact(big)
done.set()
sampler.join()
batch_bytes = sum(t.numel() * t.element_size() for t in (big.keys, big.values, big.queries, big.content_keys))
print(json.dumps({"grown": max(0, peak[0] - before), "batch": batch_bytes}))
"""


def test_the_estimate_covers_a_real_solve_without_inflating_it():
    result = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True, timeout=600)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # the solve's own allocations plus its batch (the estimate counts both; the batch was made before measuring)
    used = measured["grown"] + measured["batch"]
    estimate = SOLVE_FIXED_BYTES + 12 * head_solve_bytes(3000, 768, 300, 64, dtype_bytes=2)
    assert used <= estimate <= 4 * used, (used / MiB, estimate / MiB)


def test_solves_stay_within_the_workspace_and_segments_do_not_change(monkeypatch):
    """With each KV head estimated at 5 MiB and a 16 MiB workspace (4 MiB fixed), a solve takes one layer (2 heads):
    the pressure step of test_compactor_step_order is cut into one-layer solves, in plan order, and every segment is
    the one the uncut step makes."""
    def run(workspace_mib: int) -> tuple[list, list[int]]:
        compactor = _compactor(WITH_QUERIES)
        compactor.state.config.workspace_mib = workspace_mib
        solved: list[int] = []
        original = compactor._solve

        def recording(batch, method):
            solved.append(batch.num_heads)
            return original(batch, method)

        monkeypatch.setattr(compactor, "_solve", recording)
        compactor.execute(CompactionStep(plans=[HELD]), layers_per_step=1)
        report = compactor.execute(CompactionStep(plans=PRESSURE_STEP), layers_per_step=1)
        assert sorted(report.written) == ["fallback", "held", "recent", "snapkv"] and not report.failed
        return [_segment(compactor, plan.req_id) for plan in (HELD, *PRESSURE_STEP)], solved

    uncut, uncut_solves = run(workspace_mib=1024)
    monkeypatch.setattr(compactor_module, "head_solve_bytes", lambda *args, **kwargs: 5 * MiB)
    cut, cut_solves = run(workspace_mib=16)
    assert max(cut_solves) <= KV_HEADS < max(uncut_solves), (cut_solves, uncut_solves)
    assert sum(cut_solves) == sum(uncut_solves) == KV_HEADS * LAYERS * (1 + len(PRESSURE_STEP))
    for want, have in zip(uncut, cut):
        for a, b in zip(want, have):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
