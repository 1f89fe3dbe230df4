"""Engine-independent Attention Matching: compact the KV span of many heads in one batched call.

No vLLM and no pydantic imports here: a GPU box without them must be able to run this package.
"""

from vllm_compact.am.budgets import proportional_budgets, uniform_budgets
from vllm_compact.am.methods import (
    METHODS,
    AttentionMatching,
    CompactionMethod,
    EvictionMethod,
    compact_heads,
    get_method,
    method_class,
    method_options,
)
from vllm_compact.am.metrics import attention_errors
from vllm_compact.am.types import CompactedHeads, HeadBatch

__all__ = [
    "METHODS",
    "AttentionMatching",
    "CompactedHeads",
    "CompactionMethod",
    "EvictionMethod",
    "HeadBatch",
    "attention_errors",
    "compact_heads",
    "get_method",
    "method_class",
    "method_options",
    "proportional_budgets",
    "uniform_budgets",
]
