"""CPU attention backend with compaction: stock kernel for plain requests, tail + compact segment for the others.

Requests without a compact segment go through vLLM's own CPU kernel untouched (when no request in the batch is
compacted, the stock metadata and forward are used as they are). A compacted request's attention is the merge of
(a) causal attention over its uncompacted tail (protected head pages + pages after the segment) and (b) bias-aware
attention over its compact segment, both read in place from the pool pages into buffers that live for one layer
(core/request_kv.py):
- the decode tokens of all compacted requests go through one fused softmax per layer (CompactedDecodeBatch), the
  entries' beta and the padding in its additive mask;
- a prefill chunk is merged exactly per request (kernels/request_attention.py).
Queries are captured into a request's reservoir only while it may still compact (core/planner.py:
may_compact_again): they are the reference queries of its next compaction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_compact.core.request_kv import CompactedDecodeBatch, read_request_kv
from vllm_compact.core.state import CompactSegment, WorkerRequest, worker_state
from vllm_compact.integration.block_probe import stock_block_layout
from vllm_compact.kernels.request_attention import compacted_attention


@dataclass
class CompactedRequestView:
    req_id: str
    query_start: int
    query_len: int
    tail_block_ids: torch.Tensor  # [n] int64: protected head pages, then the pages after the segment
    tail_len: int                 # physical tokens in those pages, this step's tokens included
    segment: CompactSegment


@dataclass
class CompactionAttentionInfo:
    query_start_loc: list[int]           # per batch row, plus the end
    compacted: list[CompactedRequestView]  # compacted requests with a prefill chunk this step
    captures: list[tuple[int, WorkerRequest]]  # (batch row, record) of the requests whose queries are kept
    decode: CompactedDecodeBatch | None = None  # compacted requests with one decode token this step
    decode_token_index: torch.Tensor | None = None  # their tokens in the batch
    plain_token_index: torch.Tensor | None = None   # tokens of plain requests (when some are compacted)
    plain_metadata: CPUAttentionMetadata | None = None


@dataclass
class CompactionCPUAttentionMetadata(CPUAttentionMetadata):
    compaction: CompactionAttentionInfo | None = None


class CompactionCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta = CompactionCPUAttentionMetadata(**{f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)})
        state = worker_state()
        num_reqs = common_attn_metadata.num_reqs
        if state is None or state.input_batch is None or self.is_encoder_only_attention:
            return meta
        req_ids = list(state.input_batch.req_ids[:num_reqs])
        if len(req_ids) != num_reqs or any(r is None for r in req_ids):
            return meta  # a dummy/profiling batch
        qsl = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
        info = CompactionAttentionInfo(query_start_loc=qsl, compacted=[], captures=[])
        seq_lens = common_attn_metadata.seq_lens[:num_reqs].tolist()
        block_table = common_attn_metadata.block_table_tensor
        plain_rows, decode_views = [], []
        for row, req_id in enumerate(req_ids):
            record = state.requests.get(req_id) or state.record(req_id)
            if record.captures:
                info.captures.append((row, record))
            segment = record.segment
            if segment is None:
                plain_rows.append(row)
                continue
            seq_len = seq_lens[row]
            num_blocks = -(-seq_len // self.block_size)
            row_blocks = block_table[row]
            tail_ids = torch.cat([row_blocks[: segment.start_block], row_blocks[segment.end_block : num_blocks]])
            compacted_tokens = (segment.end_block - segment.start_block) * self.block_size
            view = CompactedRequestView(
                req_id=req_id,
                query_start=qsl[row],
                query_len=qsl[row + 1] - qsl[row],
                tail_block_ids=tail_ids.long(),
                tail_len=seq_len - compacted_tokens,
                segment=segment,
            )
            if view.query_len == 1:
                decode_views.append((view, record))
            else:
                info.compacted.append(view)
        if decode_views:
            info.decode = CompactedDecodeBatch(
                [state.decode_index(record) for _, record in decode_views],
                [view.tail_block_ids for view, _ in decode_views], [view.tail_len for view, _ in decode_views],
                self.block_size)
            info.decode_token_index = torch.tensor([view.query_start for view, _ in decode_views])
        if (info.compacted or decode_views) and plain_rows:
            info.plain_token_index, info.plain_metadata = self._plain_subset(meta, plain_rows, qsl, seq_lens)
        if info.compacted or decode_views or info.captures:
            meta.compaction = info
        return meta

    def _plain_subset(self, meta, rows, qsl, seq_lens):
        """Stock metadata for the plain requests alone, and where their tokens sit in the batch."""
        token_index = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in rows])
        plain = self._stock_metadata(meta, [qsl[r + 1] - qsl[r] for r in rows], [seq_lens[r] for r in rows],
                                     meta.block_table[rows])
        return token_index, plain

    def _stock_metadata(self, meta, query_lens: list[int], seq_lens: list[int], block_table) -> CPUAttentionMetadata:
        """The stock kernel's metadata for a sub-batch: these query lengths over these blocks and lengths."""
        query_lens_t = torch.tensor(query_lens, dtype=torch.int32)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.cumsum(query_lens_t, 0)
        sub_seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(query_lens),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_lens=sub_seq_lens,
            dtype=self.dtype,
            query_start_loc=query_start_loc,
            causal=meta.causal,
            sliding_window_size=self.window_size,
            isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        return CPUAttentionMetadata(
            num_actual_tokens=int(query_start_loc[-1]),
            max_query_len=max(query_lens),
            query_start_loc=query_start_loc,
            max_seq_len=max(seq_lens),
            seq_lens=sub_seq_lens,
            block_table=block_table,
            slot_mapping=meta.slot_mapping,
            scheduler_metadata=scheduler_metadata,
            causal=meta.causal,
        )


class CompactionCPUAttentionImpl(CPUAttentionBackendImpl):
    _layer_index: int | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        info = getattr(attn_metadata, "compaction", None)
        if info is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if self._layer_index is None:
            self._layer_index = extract_layer_index(layer.layer_name)
        self._capture_queries(info, query)
        if not info.compacted and info.decode is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        if info.plain_metadata is not None:
            index = info.plain_token_index
            plain_out = torch.empty((index.numel(), self.num_heads, self.head_size), dtype=output.dtype)
            super().forward(layer, query[index], None, None, kv_cache, info.plain_metadata, plain_out)
            out[index] = plain_out
        layout = stock_block_layout(kv_cache.shape[1], kv_cache.shape[2], self.head_size, kv_cache.dtype, layer.isa)
        if info.decode is not None:
            index = info.decode_token_index
            decoded, workspace = info.decode.attend(self._layer_index, query[index].view(-1, self.num_heads,
                                                    self.head_size), kv_cache, layout, self.scale)
            out[index] = decoded.to(output.dtype)
            worker_state().stats.note_workspace(workspace)
        for view in info.compacted:
            rows = slice(view.query_start, view.query_start + view.query_len)
            kv = read_request_kv(view.segment, self._layer_index, kv_cache, layout, view.tail_block_ids, view.tail_len)
            worker_state().stats.note_workspace(kv.nbytes)
            out[rows] = compacted_attention(query[rows], kv.keys, kv.values, kv.bias, kv.num_entries,
                                            self.scale).to(output.dtype)
        return output

    def _capture_queries(self, info: CompactionAttentionInfo, query: torch.Tensor) -> None:
        state = worker_state()
        qsl = info.query_start_loc
        for row, record in info.captures:
            reservoir = state.reservoir(record, self.num_heads, self.head_size, query.dtype)
            reservoir.append(self._layer_index, query[qsl[row] : qsl[row + 1]])


class CompactionCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return CompactionCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return CompactionCPUAttentionMetadataBuilder
