"""What crosses the scheduler <-> worker boundary: plans go out inside SchedulerOutput, the report comes back inside
ModelRunnerOutput (both pickled)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestCompactionPlan:
    """Compact logical blocks [start_block, end_block) of one request into `dest_block_ids`.

    Blocks [start_block, prev_end_block) are already a compact segment (re-compaction folds it in with its beta);
    `source_block_ids` hold the uncompacted blocks [prev_end_block, end_block). The scheduler holds the source and
    previous compact pages until the worker's report lists the plan as written; any other plan leaves the request
    exactly as it was (source pages in its block table, old segment in place). With `sources_released` (memory
    pressure) they are already back in the pool and may be the destination pages of a later plan of the same step:
    the worker reads every plan's pages before it writes any (SegmentCompactor._read_all) and before the step writes
    any KV (synchronous scheduling), and its last resort is a copy of the span's newest keys; such a plan cannot be
    undone, so if it is not reported written the scheduler preempts the request, which recomputes its KV from its
    tokens.
    """

    req_id: str
    start_block: int
    prev_end_block: int
    end_block: int
    source_block_ids: tuple[int, ...]
    dest_block_ids: tuple[int, ...]
    head_budgets: tuple[tuple[int, ...], ...]  # [num_layers][num_kv_heads] compact entries per head
    method: str
    sources_released: bool = False

    @property
    def logical_tokens(self) -> int:
        """Tokens the new compact segment stands for (set by the scheduler from the block size)."""
        return self.end_block - self.start_block


@dataclass
class CompactionStep:
    """All compaction work of one engine step."""

    plans: list[RequestCompactionPlan] = field(default_factory=list)
    cancelled: tuple[str, ...] = ()  # plans the scheduler undid while the worker still had them in flight


@dataclass(frozen=True)
class CompactionReport:
    """What the worker did with the plans in flight. Fail closed: only the plans listed in `written` have their
    segment written, and those in `pending` are still being carried out; the scheduler undoes every other plan it
    sent, whether the worker listed it in `failed`, left it out, or sent no report at all (a model runner that is
    not ours never executes a plan)."""

    written: tuple[str, ...] = ()  # req_ids whose compact segment is written and installed
    failed: tuple[str, ...] = ()   # req_ids the worker tried and left uncompacted (logs and stats only)
    pending: tuple[str, ...] = ()  # req_ids whose plan is still in flight (layer chunks left for later steps)
