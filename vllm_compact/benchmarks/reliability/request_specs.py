"""What each request sends: its seeded spec, its vllm_xargs (valid or not), its body, the prose of its prompt."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any

KEY_ENABLED = "kv_compaction_enabled"
KEY_RATIO = "kv_compaction_ratio"
KEY_METHOD = "kv_compaction_method"


@dataclass
class RequestSpec:
    index: int
    endpoint: str              # "completions" | "chat"
    stream: bool
    include_usage: bool
    prompt_tokens: int
    max_tokens: int
    overrides: str             # "none" | "valid" | "invalid"
    expect_valid: bool         # the server must answer it (else: a 4xx)
    xargs: Any = None          # the vllm_xargs value sent (None: the field is left out)
    invalid_key: str | None = None  # the key a rejection must name (None: vllm_xargs itself)
    stop: list[str] | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    disconnect_after_chunks: int | None = None  # streaming: close after this many data chunks
    abandon_after_s: float | None = None        # non-streaming: give up after this long
    prompt_offset: int = 0     # where the prompt starts in the token source


@dataclass
class ServerRules:
    """What GET /v1/compaction/config says a request may ask for."""

    ratio: float
    methods: list[str]
    enabled: bool = True


def parse_rules(config_body: dict) -> ServerRules:
    config = config_body["config"]
    help_ = config_body.get("per_request", {}).get(KEY_METHOD, "")
    methods = [m.strip() for m in help_.removeprefix("one of ").split(",") if m.strip()]
    if not methods:
        from vllm_compact.core.request_overrides import METHODS

        methods = list(METHODS)
    return ServerRules(ratio=float(config["ratio"]), methods=methods, enabled=bool(config["enabled"]))


def valid_xargs(rng: random.Random, rules: ServerRules) -> dict:
    """One to three kv_compaction_* keys the server must accept (JSON numbers and booleans only: strings such as
    "20" or "true" are not part of the contract)."""
    out: dict = {}
    keys = rng.sample([KEY_RATIO, KEY_METHOD, KEY_ENABLED], rng.randint(1, 3))
    for key in keys:
        if key == KEY_RATIO:
            ratio = rng.choice([rules.ratio, rules.ratio * 1.5, rules.ratio * 2, max(rules.ratio, 20.0),
                                max(rules.ratio, 50.0)])
            out[key] = rng.choice([ratio, int(ratio) if float(ratio).is_integer() else ratio])
        elif key == KEY_METHOD:
            out[key] = rng.choice(rules.methods)
        else:
            out[key] = rng.choice([True, False, 1, 0] if rules.enabled else [False, 0])
    return out


# A value of the wrong type is refused whatever else the request asks; a ratio out of range only while the
# request leaves compaction on (turning it off is always allowed, and then the ratio is not checked against
# the server's).
_TYPE_INVALID = {
    KEY_RATIO: ["abc", "nan", "inf", "-inf", True, [10], ""],
    KEY_METHOD: ["bogus", "AM-HIGHEST-ATTENTION", 7, ""],
    KEY_ENABLED: ["maybe", 2, 0.5, ""],
}


def invalid_xargs(rng: random.Random, rules: ServerRules) -> tuple[Any, str | None]:
    """(a vllm_xargs value the server must reject, the kv_compaction key the rejection names or None)."""
    kind = rng.choice(["type", "type", "range", "unknown_key", "not_an_object"])
    if kind == "not_an_object":
        return rng.choice(["kv_compaction_ratio=20", [KEY_RATIO, 20]]), None
    base = valid_xargs(rng, rules)
    if kind == "unknown_key":
        key = rng.choice(["kv_compaction_ratios", "kv_compaction_foo", "kv_compaction_"])
        base[key] = 1
        return base, key
    if kind == "range":
        base.pop(KEY_ENABLED, None)
        ratios = [0.5, -3, 0, 5000, 1e300] + ([rules.ratio / 2] if rules.ratio / 2 >= 1 else [])
        base[KEY_RATIO] = rng.choice(ratios)
        return base, KEY_RATIO
    key = rng.choice(list(_TYPE_INVALID))
    base[key] = rng.choice(_TYPE_INVALID[key])
    return base, key


def make_specs(args: argparse.Namespace, rules: ServerRules, source_tokens: int) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    specs = []
    for i in range(args.requests):
        stream = rng.random() < args.stream_share
        draw = rng.random()
        overrides = ("valid" if draw < args.valid_override_share
                     else "invalid" if draw < args.valid_override_share + args.invalid_override_share else "none")
        spec = RequestSpec(
            index=i,
            endpoint="chat" if rng.random() < args.chat_share else "completions",
            stream=stream,
            include_usage=stream and rng.random() < 0.5,
            prompt_tokens=rng.randint(args.min_prompt, args.max_prompt),
            max_tokens=rng.randint(args.min_tokens, args.max_tokens),
            overrides=overrides,
            expect_valid=overrides != "invalid",
            temperature=rng.choice([0.0, 0.0, 0.8]),
        )
        spec.prompt_offset = rng.randrange(max(1, source_tokens - spec.prompt_tokens))
        style = rng.random()
        if style < 0.3:
            spec.ignore_eos = True
        elif style < 0.5:
            spec.stop = [rng.choice([".", "\n", " the"])]
        if overrides == "valid":
            spec.xargs = valid_xargs(rng, rules)
        elif overrides == "invalid":
            spec.xargs, spec.invalid_key = invalid_xargs(rng, rules)
        if overrides != "invalid" and rng.random() < args.disconnect_share:
            if stream:
                spec.disconnect_after_chunks = rng.randint(1, max(1, spec.max_tokens // 2))
            else:
                spec.abandon_after_s = rng.uniform(0.05, 3.0)
        specs.append(spec)
    return specs


def request_body(spec: RequestSpec, model: str, prompt: str) -> dict:
    body: dict = {"model": model, "max_tokens": spec.max_tokens, "temperature": spec.temperature,
                  "stream": spec.stream}
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt + "\n\nWhat is this text about?"}]
    else:
        body["prompt"] = prompt
    if spec.include_usage:
        body["stream_options"] = {"include_usage": True}
    if spec.stop:
        body["stop"] = spec.stop
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.xargs is not None:
        body["vllm_xargs"] = spec.xargs
    return body


def token_source(tokenizer, min_tokens: int) -> list[int]:
    """Token ids of English prose (the essays when the data is there, else seeded word salad)."""
    try:
        from vllm_compact.data.essays import essay_text

        text = essay_text()[:400_000]
    except Exception:  # noqa: BLE001 - no data on this machine: any text crosses the trigger as well
        rng = random.Random(0)
        words = "the of and to in is that it was for on are with as his they at be this from have or by".split()
        text = " ".join(rng.choice(words) for _ in range(4 * min_tokens))
    return tokenizer.encode(text, add_special_tokens=False)
