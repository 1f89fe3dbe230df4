"""Worker and model runner with compaction: execute the step's plans, then run the step as stock vLLM does."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from vllm.model_executor.layers.rotary_embedding import (
    DynamicNTKScalingRotaryEmbedding,
    Llama3RotaryEmbedding,
    LinearScalingRotaryEmbedding,
    NTKScalingRotaryEmbedding,
    RotaryEmbedding,
    YaRNScalingRotaryEmbedding,
)
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_compact.am.rotary import Rotary
from vllm_compact.config import CompactionConfig, config_from_env
from vllm_compact.core.compactor import ModelGeometry, SegmentCompactor
from vllm_compact.integration.block_probe import stock_block_layout
from vllm_compact.core.plan import CompactionReport, CompactionStep
from vllm_compact.integration.scheduler import CompactionModelRunnerOutput, compaction_step
from vllm_compact.core.state import WorkerCompactionState, init_worker_state, worker_state
from vllm_compact.core.stats_file import WorkerStats, WorkerStatsFileWriter, worker_stats


MiB = 1 << 20
logger = logging.getLogger("vllm_compact.worker")

# Rotations by one angle per (position, pair): their cos/sin table undoes them. Scaled variants multiply cos and sin
# by one factor, which the cosine similarity of unrotated keys does not see. Others (multimodal, dual-chunk) differ.
_PLAIN_ROPE = (RotaryEmbedding, LinearScalingRotaryEmbedding, Llama3RotaryEmbedding, YaRNScalingRotaryEmbedding,
               NTKScalingRotaryEmbedding, DynamicNTKScalingRotaryEmbedding)


def model_rotary(model: torch.nn.Module) -> Rotary | None:
    """The one plain RoPE every layer of `model` applies to its keys, else None (scores read rotated keys)."""
    tables = {id(m): m for m in model.modules() if hasattr(m, "cos_sin_cache")}
    plain = [m for m in tables.values() if type(m) in _PLAIN_ROPE]
    if not plain or len(plain) != len(tables):
        logger.info("vllm-compact: no plain RoPE found; key distinctiveness reads the rotated keys")
        return None
    first = plain[0]
    if any(m.cos_sin_cache.shape != first.cos_sin_cache.shape or not torch.equal(m.cos_sin_cache, first.cos_sin_cache)
           or m.is_neox_style != first.is_neox_style for m in plain[1:]):
        logger.info("vllm-compact: layers rotate keys differently; key distinctiveness reads the rotated keys")
        return None
    return Rotary.from_cos_sin_cache(first.cos_sin_cache, first.is_neox_style)


def file_stats(state: WorkerCompactionState) -> WorkerStats:
    """The worker's counters as its stats file carries them: every counter of `state.stats` (faults_injected
    included) plus the memory compaction holds outside the pool now."""
    count, pool_bytes, ratio = state.compacted_memory()
    return worker_stats(**asdict(state.stats), reservoir_bytes=state.reservoir_bytes,
                        segment_bytes=state.segment_bytes, compacted_requests=count, compacted_pool_bytes=pool_bytes,
                        outside_pool_ratio_max=ratio)


class CompactionCPUModelRunner(CPUModelRunner):
    """Adds compaction to the stock CPU model runner (installed by class swap: see CompactionCPUWorker)."""

    _compactor: SegmentCompactor | None = None
    # The worker may live in another process than the scheduler (API server): its counters get their own file.
    _stats_file: WorkerStatsFileWriter | None = None
    # This step's report, until it rides back on the step's output (execute_model's or sample_tokens').
    _report: CompactionReport | None = None

    def _bind_compaction(self) -> SegmentCompactor:
        state = worker_state()
        layers = self.compilation_config.static_forward_context
        attn = sorted(
            ((extract_layer_index(name), layer) for name, layer in layers.items() if hasattr(layer, "kv_cache")),
            key=lambda item: item[0],
        )
        state.num_layers = len(attn)
        state.layer_caches = [layer.kv_cache for _, layer in attn]
        state.input_batch = self.input_batch
        state.runner_requests = self.requests
        state.block_size = state.layer_caches[0].shape[2]
        first = attn[0][1]
        cache = state.layer_caches[0]
        geometry = ModelGeometry(
            num_layers=len(attn),
            num_kv_heads=cache.shape[1],
            num_q_heads=first.num_heads,
            head_dim=first.head_size,
            block_size=cache.shape[2],
            scales=tuple(float(layer.impl.scale) for _, layer in attn),
            rotary=model_rotary(self.get_model()),
        )
        layout = stock_block_layout(cache.shape[1], cache.shape[2], first.head_size, cache.dtype, first.isa)
        return SegmentCompactor(state, layout, geometry)

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._report = None  # never a previous step's: a plan missing from its own step's report is undone
        state = worker_state()
        if state is not None and self.kv_caches:
            if self._compactor is None:
                self._compactor = self._bind_compaction()
            ended = [*scheduler_output.finished_req_ids, *(getattr(scheduler_output, "preempted_req_ids", None) or ())]
            state.drop(ended)
            self._compactor.forget(ended)
            step = compaction_step(scheduler_output)
            if step is not None or self._compactor.in_flight:
                self._report = self._compactor.execute(step or CompactionStep(), state.config.layers_per_step)
            if self._stats_file is not None:
                # A plan that lands in a step without new plans (layer chunks) is news too: the engine may go idle.
                landed = self._report is not None and bool(self._report.written or self._report.failed)
                self._stats_file.maybe_write(lambda: file_stats(state), force=step is not None or landed)
        return self._with_report(super().execute_model(scheduler_output, intermediate_tensors))

    def sample_tokens(self, *args, **kwargs):
        return self._with_report(super().sample_tokens(*args, **kwargs))

    def _with_report(self, output):
        """The step's output, carrying the report of the plans executed at its start (if any). An output that
        cannot carry it reaches the scheduler without a report, which then undoes the step's plans (fail closed)."""
        if self._report is None or not isinstance(output, ModelRunnerOutput):
            return output
        report, self._report = self._report, None
        return CompactionModelRunnerOutput.of(output, report)


class CompactionCPUWorker(CPUWorker):
    def determine_available_memory(self) -> int:
        """vLLM's KV cache budget less the compaction workspace (`workspace_mib`): pool + workspace = budget."""
        budget = super().determine_available_memory()
        state = worker_state()
        if state is None:
            return budget
        reserved = state.config.workspace_mib * MiB
        if reserved >= budget:
            raise ValueError(
                f"--kv-compaction-workspace-mib ({state.config.workspace_mib}) leaves no KV pool in a KV cache budget "
                f"of {budget // MiB} MiB: lower it or raise --kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE"
            )
        logger.info("vllm-compact: %d MiB of the %d MiB KV cache budget kept for compaction work "
                    "(--kv-compaction-workspace-mib); KV pool %d MiB", reserved // MiB, budget // MiB,
                    (budget - reserved) // MiB)
        return budget - reserved

    def init_device(self):
        super().init_device()
        config = config_from_env() or CompactionConfig(enabled=False)
        if config.enabled and type(self.model_runner) is CPUModelRunner:
            init_worker_state(config)
            # The runner is built inside init_device; swapping its class keeps its state and adds our methods.
            self.model_runner.__class__ = CompactionCPUModelRunner
            self.model_runner._stats_file = WorkerStatsFileWriter.from_env(self.rank)
