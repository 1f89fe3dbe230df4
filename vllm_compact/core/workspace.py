"""Memory a compaction step uses outside the KV pool, estimated per (layer, KV head) before anything is read.

The compactor splits a step's work into solves whose estimate stays within `workspace_mib`, the share of the KV
cache budget the worker keeps for it (integration/worker.py). The estimate counts, per head: its keys and values as
read from the pages and as batched (model dtype, plus the position-free keys), their fp32 copies in the reference
pass, the queries and reference outputs, the [queries x budget] fp32 matrices of the fit (entry logits, mass matrix
and its masked copies, softmax) and the [budget x budget] normal equations. A solve's 2 MiB logits tile and the
allocator's slack are the fixed part. Checked against the measured peak in tests/core/test_workspace.py.
"""

from __future__ import annotations

MiB = 1 << 20
SOLVE_FIXED_BYTES = 4 * MiB
_FP32 = 4


def head_solve_bytes(keys: int, queries: int, budget: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes one (layer, KV head) adds to a step: `keys` span keys (old entries included), `queries` reference
    query rows (every query head of its group), `budget` compact entries."""
    key_bytes = keys * head_dim * (2 * dtype_bytes + 3 * dtype_bytes + 2 * _FP32) + keys * 4 * _FP32
    query_bytes = queries * head_dim * (dtype_bytes + 2 * _FP32)
    fit_bytes = queries * budget * 6 * _FP32 + budget * budget * 3 * _FP32
    return key_bytes + query_bytes + fit_bytes
