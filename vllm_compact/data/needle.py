"""Needle-in-a-haystack prompts and held-out continuations, built from the essays with a given tokenizer.

Written for this project (RULER's generator scripts need packages and NLTK data that are not available here);
the prompt wording follows RULER's single-needle task: a "special magic" value for a key is hidden in essay text
at a chosen depth and asked for at the end.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Protocol

from vllm_compact.data.essays import essay_text, sentence_starts

KINDS = ("number", "word", "uuid")
_NOUNS = {"number": "number", "word": "word", "uuid": "code"}

_ADJECTIVES = (
    "amber", "brave", "calm", "crimson", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "kind",
    "lively", "mellow", "nimble", "olive", "plain", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid", "wary",
    "young", "zesty", "bitter", "cosmic", "frozen", "golden", "hidden", "lucky",
)
_OBJECTS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "marble", "needle", "orchard", "pepper", "quartz", "rocket", "saddle", "tunnel", "umbrella",
    "violin", "walnut", "yogurt", "zipper", "biscuit", "compass", "drum", "feather", "glacier", "hammer", "ladder",
)


class TextTokenizer(Protocol):
    """What the generators need from a tokenizer (a transformers tokenizer fits)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


@dataclass(frozen=True)
class NeedlePrompt:
    prompt: str  # instruction + haystack with the needle + question + answer prefix
    context_tokens: int  # tokens of `prompt` (tokenizer.encode without special tokens)
    needle: str  # the inserted sentence
    answer: str  # the value the model must reproduce
    depth: float  # achieved needle depth: haystack tokens before the needle / haystack tokens
    question: str
    answer_prefix: str  # the prompt's last words, so a completion starts with the answer
    key: str
    kind: str
    seed: int

    def is_answered_by(self, completion: str) -> bool:
        return self.answer.lower() in completion.lower()


@dataclass(frozen=True)
class ContinuationSplit:
    """Essay context and the text that follows it, for log-perplexity of the continuation given the context."""

    context: str
    continuation: str
    context_ids: list[int]  # token-exact: score these, re-tokenizing the texts may shift the boundary
    continuation_ids: list[int]
    start_char: int  # where the context starts in essay_text()


def needle_depths(count: int) -> list[float]:
    """`count` needle depths evenly spaced in [0, 1] (one prompt: the middle)."""
    return [i / (count - 1) for i in range(count)] if count > 1 else [0.5]


def _count(tokenizer: TextTokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _pair(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_OBJECTS)}"


def _needle_value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return _pair(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _essay_ring(start: int, chars: int) -> str:
    """`chars` characters of the essays from `start`, read as a ring (the end joins the beginning with a space)."""
    ring = essay_text() + " "
    start %= len(ring)
    pieces = []
    while chars > 0:
        piece = ring[start : start + chars]
        pieces.append(piece)
        chars -= len(piece)
        start = 0
    return "".join(pieces)


def _seeded_sentence_start(rng: random.Random) -> int:
    starts = sentence_starts(essay_text())
    return starts[rng.randrange(len(starts))]


def _tokens_from(tokenizer: TextTokenizer, start: int, count: int) -> list[int]:
    """The first `count` tokens of the essays from character `start` (the window grows until it has them)."""
    chars = 8 * count + 256
    while len(ids := tokenizer.encode(_essay_ring(start, chars), add_special_tokens=False)) <= count:
        chars *= 2  # one spare token: the window's last token may be cut mid-word
    return ids[:count]


def _tokens_before(tokenizer: TextTokenizer, end: int, count: int) -> list[int]:
    """The last `count` tokens of the essays before character `end`."""
    chars = 8 * count + 256
    while len(ids := tokenizer.encode(_essay_ring(end - chars, chars), add_special_tokens=False)) <= count:
        chars *= 2  # one spare token: the window's first token may be cut mid-word
    return ids[-count:]


def _insert_at_depths(
    tokenizer: TextTokenizer, haystack_ids: list[int], needles: list[tuple[float, str]]
) -> tuple[str, list[float]]:
    """Haystack text with each (depth, needle) at the sentence start nearest to its depth; returns (text, achieved
    depths in the order given)."""
    haystack = tokenizer.decode(haystack_ids).rstrip()
    boundaries = sentence_starts(haystack) + [len(haystack)]
    positions = []
    for depth, _ in needles:
        target_char = len(tokenizer.decode(haystack_ids[: round(depth * len(haystack_ids))]))
        positions.append(min(boundaries, key=lambda boundary: abs(boundary - target_char)))
    text = haystack
    for position, (_, needle) in sorted(zip(positions, needles), key=lambda pair: -pair[0]):
        before, after = text[:position], text[position:]  # last position first: earlier ones stay valid
        if not before:
            text = f"{needle} {after}"
        elif not after:
            text = f"{before.rstrip()} {needle}"
        else:
            text = f"{before.rstrip()} {needle} {after}"
    achieved = [min(1.0, _count(tokenizer, haystack[:p]) / max(1, len(haystack_ids))) for p in positions]
    return text, achieved


def _fit(tokenizer: TextTokenizer, context_tokens: int, overhead: int, assemble) -> tuple[str, list[float], int]:
    """(prompt, achieved depths, length) of the longest `assemble(haystack budget)` within `context_tokens`."""
    budget = context_tokens - overhead
    best: tuple[str, list[float], int] | None = None
    for _ in range(6):  # token counts of joined text differ from the sum of parts by a few: converge on it
        prompt, achieved = assemble(budget)
        length = _count(tokenizer, prompt)
        if length <= context_tokens and (best is None or length > best[2]):
            best = (prompt, achieved, length)
        if length == context_tokens:
            break
        budget += context_tokens - length
    if best is None:
        raise ValueError(f"could not fit a needle prompt into {context_tokens} tokens")
    return best


def make_needle_prompt(
    tokenizer: TextTokenizer, context_tokens: int, depth: float, kind: str = "number", seed: int = 0
) -> NeedlePrompt:
    """A prompt of about `context_tokens` tokens (never more) with one needle at `depth` (0 = start, 1 = end)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], not {depth}")
    rng = random.Random(f"needle:{seed}:{kind}")
    noun = _NOUNS[kind]
    key, answer = _pair(rng), _needle_value(kind, rng)
    needle = f"One of the special magic {noun}s for {key} is: {answer}."
    header = (
        f"Some special magic {noun}s are hidden within the following text. Make sure to memorize them. "
        f"I will quiz you about the {noun}s afterwards.\n"
    )
    question = f"What is the special magic {noun} for {key} mentioned in the provided text?"
    answer_prefix = f"The special magic {noun} for {key} mentioned in the provided text is"

    overhead = _count(tokenizer, f"{header}{needle}\n{question} {answer_prefix}")
    if context_tokens < overhead + 16:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for a haystack (overhead {overhead})")
    # The haystack ends where a sentence ends, so a needle at depth 1 follows a complete sentence.
    all_ids = _tokens_before(tokenizer, _seeded_sentence_start(rng), 2 * context_tokens)

    def assemble(budget: int) -> tuple[str, list[float]]:
        haystack, achieved = _insert_at_depths(tokenizer, all_ids[-budget:], [(depth, needle)])
        return f"{header}{haystack}\n{question} {answer_prefix}", achieved

    prompt, (achieved,), length = _fit(tokenizer, context_tokens, overhead, assemble)
    return NeedlePrompt(
        prompt=prompt,
        context_tokens=length,
        needle=needle,
        answer=answer,
        depth=achieved,
        question=question,
        answer_prefix=answer_prefix,
        key=key,
        kind=kind,
        seed=seed,
    )


def continuation_split(
    tokenizer: TextTokenizer, context_tokens: int, continuation_tokens: int, seed: int = 0
) -> ContinuationSplit:
    """`context_tokens` tokens of essay text from a seeded sentence start, then the next `continuation_tokens`."""
    if context_tokens < 1 or continuation_tokens < 1:
        raise ValueError("context_tokens and continuation_tokens must be positive")
    rng = random.Random(f"continuation:{seed}")
    start = _seeded_sentence_start(rng)
    ids = _tokens_from(tokenizer, start, context_tokens + continuation_tokens)
    context_ids, continuation_ids = ids[:context_tokens], ids[context_tokens:]
    return ContinuationSplit(
        context=tokenizer.decode(context_ids),
        continuation=tokenizer.decode(continuation_ids),
        context_ids=context_ids,
        continuation_ids=continuation_ids,
        start_char=start,
    )


def make_multi_needle_prompt(tokenizer: TextTokenizer, context_tokens: int, depth: float, seed: int = 0) -> NeedlePrompt:
    """Like make_needle_prompt("number"), but with three confusable facts: the same noun, three keys, three 7-digit
    values, the asked one at `depth` and the other two a third and two thirds of the haystack away (wrapping around),
    so the answer must come from the right key, not from the only number in sight. kind "multi"."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], not {depth}")
    rng = random.Random(f"multi-needle:{seed}")
    keys: list[str] = []
    while len(keys) < 3:  # distinct keys: a repeated one would make the question ambiguous
        if (key := _pair(rng)) not in keys:
            keys.append(key)
    values = [str(value) for value in rng.sample(range(1_000_000, 10_000_000), 3)]
    needles = [f"One of the special magic numbers for {key} is: {value}." for key, value in zip(keys, values)]
    depths = [depth, (depth + 1 / 3) % 1.0, (depth + 2 / 3) % 1.0]
    header = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards.\n"
    )
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    answer_prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"

    overhead = _count(tokenizer, f"{header}{' '.join(needles)}\n{question} {answer_prefix}")
    if context_tokens < overhead + 16:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for a haystack (overhead {overhead})")
    all_ids = _tokens_before(tokenizer, _seeded_sentence_start(rng), 2 * context_tokens)

    def assemble(budget: int) -> tuple[str, list[float]]:
        haystack, achieved = _insert_at_depths(tokenizer, all_ids[-budget:], list(zip(depths, needles)))
        return f"{header}{haystack}\n{question} {answer_prefix}", achieved

    prompt, achieved, length = _fit(tokenizer, context_tokens, overhead, assemble)
    return NeedlePrompt(
        prompt=prompt,
        context_tokens=length,
        needle=needles[0],
        answer=values[0],
        depth=achieved[0],
        question=question,
        answer_prefix=answer_prefix,
        key=keys[0],
        kind="multi",
        seed=seed,
    )
