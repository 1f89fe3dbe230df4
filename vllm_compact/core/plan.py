"""What crosses the scheduler -> worker boundary (pickled inside SchedulerOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestCompactionPlan:
    """Compact logical blocks [start_block, end_block) of one request into `dest_block_ids`.

    Blocks [start_block, prev_end_block) are already a compact segment (re-compaction folds it in with its beta);
    `source_block_ids` hold the uncompacted blocks [prev_end_block, end_block). The scheduler has already freed the
    source and previous compact pages in its pool; the worker reads them at the start of the step, before any KV of
    the step is written (synchronous scheduling), then they may be reused.
    """

    req_id: str
    start_block: int
    prev_end_block: int
    end_block: int
    source_block_ids: tuple[int, ...]
    dest_block_ids: tuple[int, ...]
    head_budgets: tuple[tuple[int, ...], ...]  # [num_layers][num_kv_heads] compact entries per head
    method: str

    @property
    def logical_tokens(self) -> int:
        """Tokens the new compact segment stands for (set by the scheduler from the block size)."""
        return self.end_block - self.start_block


@dataclass
class CompactionStep:
    """All compaction work of one engine step."""

    plans: list[RequestCompactionPlan] = field(default_factory=list)
