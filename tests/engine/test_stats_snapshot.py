"""What the engine puts in the stats file: the scheduler's snapshot (free KV pages) and the worker's counters
(faults_injected included) as the worker process writes them."""

from __future__ import annotations

from types import SimpleNamespace

from vllm.v1.core.block_pool import BlockPool

from vllm_compact.config import CompactionConfig
from vllm_compact.integration.scheduler import CompactionScheduler
from vllm_compact.core.state import WorkerCompactionState
from vllm_compact.core.stats import SchedulerCompactionStats
from vllm_compact.core.budgets import HeadBudgetPolicy
from vllm_compact.core.planner import CompactionPlanner
from vllm_compact.core.stats_file import (
    StatsSnapshot,
    WorkerStats,
    read_stats_file,
    write_stats_file,
    write_worker_stats_file,
)
from vllm_compact.integration.worker import file_stats


def _scheduler(pool: BlockPool) -> CompactionScheduler:
    """A CompactionScheduler with only what _stats_snapshot reads (no engine behind it)."""
    sched = CompactionScheduler.__new__(CompactionScheduler)
    sched.kv_cache_manager = SimpleNamespace(block_pool=pool)
    sched.running = []
    sched.compaction_active = True
    sched.planner = CompactionPlanner(HeadBudgetPolicy(num_layers=2, num_kv_heads=1, ratio=10), block_size=16)
    sched.compaction_config = CompactionConfig(enabled=True)
    sched.compaction_stats = SchedulerCompactionStats()
    return sched


def test_snapshot_reports_the_pools_free_pages(tmp_path):
    pool = BlockPool(num_gpu_blocks=10, enable_caching=False, hash_block_size=16)
    sched = _scheduler(pool)
    idle = sched._stats_snapshot()
    assert idle["pool"] == {"free_pages": 9, "total_pages": 10}  # the null page is never free
    assert set(idle) == set(StatsSnapshot.__annotations__)
    assert set(idle["worker"]) == set(WorkerStats.__annotations__)
    taken = pool.get_new_blocks(3)
    assert sched._stats_snapshot()["pool"]["free_pages"] == 6
    pool.free_blocks(taken)
    assert sched._stats_snapshot()["pool"]["free_pages"] == 9
    write_stats_file(tmp_path / "s.json", {**idle, "updated": 1.0, "requests": {}})
    assert read_stats_file(tmp_path / "s.json")["pool"]["free_pages"] == 9


def test_worker_counters_reach_the_file_with_faults_injected(tmp_path):
    state = WorkerCompactionState(config=CompactionConfig(enabled=True))
    state.stats.compactions, state.stats.failures, state.stats.faults_injected = 7, 2, 3
    state.stats.seconds = [0.25, 0.5]
    got = file_stats(state)
    assert set(got) == set(WorkerStats.__annotations__)
    assert (got["compactions"], got["failures"], got["faults_injected"]) == (7, 2, 3)
    assert got["seconds_total"] == 0.75 and got["outside_pool_bytes"] == 0
    # The scheduler's snapshot leaves the worker section at zero; the worker's own file replaces it on reading.
    sched = _scheduler(BlockPool(num_gpu_blocks=4, enable_caching=False, hash_block_size=16))
    write_stats_file(tmp_path / "s.json", {**sched._stats_snapshot(), "updated": 1.0, "requests": {}})
    assert read_stats_file(tmp_path / "s.json")["worker"]["compactions"] == 0
    write_worker_stats_file(tmp_path / "s.json", got)
    assert read_stats_file(tmp_path / "s.json")["worker"] == got
