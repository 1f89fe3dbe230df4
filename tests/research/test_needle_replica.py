"""research.needle_replica: configuration strings map onto the methods' own options."""

from __future__ import annotations

import pytest

from vllm_compact.am.methods import get_method
from research.needle_replica import parse_config, queries_of
from vllm_compact.benchmarks.specs import SpecError


def test_configurations_parse_to_method_options() -> None:
    spec = parse_config("am-highest-attention:10:refit_values=0:weight_bounds=1:ridge_grid=")
    assert (spec.method, spec.ratio, spec.flags, queries_of(spec)) == ("am-highest-attention", 10.0, frozenset(),
                                                                       "after")
    assert spec.options == {"refit_values": False, "weight_bounds": (1.0, 1.0), "ridge_grid": ()}
    configured = get_method(spec.method, **spec.options)
    assert configured.refit_values is False and configured.weight_bounds == (1.0, 1.0)
    protected = parse_config("snapkv:20:follow_tokens=16:protect")
    assert (protected.method, protected.ratio, protected.options, protected.flags) == (
        "snapkv", 20.0, {"follow_tokens": 16}, frozenset({"protect"}))
    assert queries_of(parse_config("am-omp:10:queries=after+context")) == "after+context"
    with pytest.raises(SpecError):
        parse_config("am-omp:10:queries=elsewhere")


def test_a_configuration_needs_a_ratio() -> None:
    with pytest.raises(SpecError):
        parse_config("snapkv")


def test_question_after_feeds_exactly_the_question_after_the_compaction() -> None:
    from transformers import AutoTokenizer

    from research.needle_replica import tokens_after
    from vllm_compact.data.needle import make_needle_prompt
    from vllm_compact.models.registry import ensure_model

    smollm2_tokenizer = AutoTokenizer.from_pretrained(ensure_model("smollm2-135m"))
    needle = make_needle_prompt(smollm2_tokenizer, 2048, 0.5, "number", seed=1)
    ids = smollm2_tokenizer.encode(needle.prompt, add_special_tokens=False)
    assert tokens_after(smollm2_tokenizer, needle, ids, "end") == 1
    n = tokens_after(smollm2_tokenizer, needle, ids, "after")
    tail = smollm2_tokenizer.decode(ids[-n:])
    assert needle.question in tail and needle.answer_prefix in tail
    document = smollm2_tokenizer.decode(ids[:-n])
    assert needle.question not in document and needle.needle in document
