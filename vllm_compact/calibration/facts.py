"""Calibration contexts that also measure retrieval: facts planted in the span, asked and answered after it.

Essay text alone scores a head by how well its compacted span serves the essay's next tokens. The heads that
copy a fact stated once, far back (retrieval heads, Wu et al. 2024; DuoAttention finds them with synthetic
passkeys), are cheap on such text and are the ones a later question needs. Here every context states `count`
facts inside the compacted span, and the held-out window is their questions and answers, teacher-forced: a
head's held-out error then includes how the answer's queries read the facts through the compacted span.

The wording, names and values are this module's own (not the needle benchmarks'), so calibration does not fit
the benchmark's template.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_HOLDERS = ("Orla Finch", "Tomas Reyne", "Ida Marsh", "Kofi Brandt", "Lena Sato", "Piet Arkwright", "Nour Vale",
            "Ezra Quinn", "Maud Okafor", "Ravi Lindqvist", "Sunniva Cole", "Hugo Tarrant")
_THINGS = ("locker code", "badge number", "account number", "parcel number", "room code", "ticket number")


@dataclass(frozen=True)
class FactContext:
    ids: list[int]  # protected head + span (facts inside) + recent window + questions and answers
    fact_positions: list[int]  # first token of each stated fact
    window: int  # tokens of the questions and answers (the held-out window)


def _facts(rng: random.Random, count: int) -> list[tuple[str, str]]:
    holders = rng.sample(_HOLDERS, count)
    facts = []
    for holder in holders:
        thing = rng.choice(_THINGS)
        digits = rng.randint(5, 8)
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        facts.append((f" For the record, the {thing} of {holder} is {value}.",
                      f"Q: What is the {thing} of {holder}? A: The {thing} of {holder} is {value}."))
    return facts


def _sentence_end_at_or_after(tokenizer, ids: list[int], start: int, stop: int) -> int:
    """The index after the first token in ids[start:stop] that ends a sentence, else `start`."""
    for i in range(start, min(stop, len(ids))):
        if tokenizer.decode([ids[i]]).rstrip().endswith((".", "!", "?")):
            return i + 1
    return start


def fact_context(tokenizer, essay_ids: list[int], protected: int, span: int, recent: int, count: int,
                 seed: int) -> FactContext:
    """`count` facts at evenly spaced depths of the span [protected, span), each after a sentence end of the
    essay; the essay continues through the recent window; the questions follow in shuffled order."""
    if count < 1 or count > len(_HOLDERS):
        raise ValueError(f"facts per context must be in 1..{len(_HOLDERS)}, got {count}")
    rng = random.Random(f"calibrate-facts:{seed}")
    facts = _facts(rng, count)
    stated = [tokenizer(statement, add_special_tokens=False)["input_ids"] for statement, _ in facts]
    room = span - protected - sum(len(s) for s in stated)  # essay tokens inside the span
    if room < 16 * count:
        raise ValueError(f"a {span - protected}-token span has no room for {count} facts")
    if len(essay_ids) < protected + room + recent:
        raise ValueError(f"{len(essay_ids)} essay tokens; the context needs {protected + room + recent}")
    essay_span = essay_ids[: protected + room]
    ids: list[int] = []
    positions = []
    previous = 0
    for i, statement in enumerate(stated):
        target = protected + room * (2 * i + 1) // (2 * count)
        cut = _sentence_end_at_or_after(tokenizer, essay_span, max(target, previous), protected + room)
        ids += essay_span[previous:cut]
        positions.append(len(ids))
        ids += statement
        previous = cut
    ids += essay_span[previous:]
    ids += essay_ids[protected + room : protected + room + recent]
    asked = [question for _, question in facts]
    rng.shuffle(asked)
    window = tokenizer("\n" + "\n".join(asked), add_special_tokens=False)["input_ids"]
    return FactContext(ids=ids + window, fact_positions=positions, window=len(window))
