"""Kernels of vllm-compact: Triton on CUDA, torch references everywhere else (same signatures).

`import vllm_compact.kernels` needs neither triton nor a GPU.
"""

from vllm_compact.kernels.compact_attention import compact_attention, compact_attention_ref, compact_attention_triton
from vllm_compact.kernels.key_scores import KeyScores, key_scores, key_scores_ref, key_scores_triton
from vllm_compact.kernels.lstsq import LstsqResult, value_lstsq, value_lstsq_path, value_lstsq_ref, value_lstsq_triton
from vllm_compact.kernels.merge import merge_attention
from vllm_compact.kernels.nnls import nnls_pg, nnls_pg_ref, nnls_pg_triton

__all__ = [
    "KeyScores",
    "LstsqResult",
    "compact_attention",
    "compact_attention_ref",
    "compact_attention_triton",
    "key_scores",
    "key_scores_ref",
    "key_scores_triton",
    "merge_attention",
    "nnls_pg",
    "nnls_pg_ref",
    "nnls_pg_triton",
    "value_lstsq",
    "value_lstsq_path",
    "value_lstsq_ref",
    "value_lstsq_triton",
]
