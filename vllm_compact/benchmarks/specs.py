"""Compaction run specs, `METHOD[:RATIO][:OPTION=VALUE...][:WORD...]`, and method options, `OPTION=VALUE`.

The one parser of both: `vllm-compact bench am --option`, and the research scripts' `--configs` / `--methods`.
An option is a field of the method's dataclass (`vllm_compact.am.methods`) and its value is read as the type of
that field's default: booleans `1`/`0`/`true`/`false`, tuples of numbers joined by `/` (`weight_bounds=1` is
`(1.0, 1.0)`, `ridge_grid=` is `()`), integers, floats, strings. Options of no known method (`--option` of
`bench am`, which applies to every AM method) are read as JSON where they parse, else kept as strings. A bare word
(`protect`) is a flag of the spec; `KEY=VALUE` pairs whose key is in `extra_keys` (`queries=after+repeat`) are kept
as strings apart from the method's options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class SpecError(ValueError):
    """A spec or option that cannot be read; the message names the part and what is allowed."""


@dataclass(frozen=True)
class MethodSpec:
    method: str
    ratio: float | None
    options: dict[str, object] = field(default_factory=dict)
    extras: dict[str, str] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()

    def label(self) -> str:
        """The spec as written back (`METHOD:RATIO:OPTION=VALUE...`), for result rows."""
        parts = [self.method] + ([f"{self.ratio:g}"] if self.ratio is not None else [])
        parts += [f"{k}={v}" for k, v in {**self.options, **self.extras}.items()] + sorted(self.flags)
        return ":".join(parts)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpecError(f"{text!r} is not a number") from None


def typed_value(key: str, raw: str, default: object) -> object:
    """`raw` read as the type of `default`, the option's default value."""
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false"):
            raise SpecError(f"option {key} takes 1, 0, true or false, not {raw!r}")
        return raw.lower() in ("1", "true")
    if isinstance(default, tuple):
        values = tuple(_number(x) for x in raw.split("/") if x)
        if len(default) == 2 and len(values) == 1:  # a pair given one value: both bounds
            values = values * 2
        return values
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise SpecError(f"option {key} takes an integer, not {raw!r}") from None
    if isinstance(default, float):
        return _number(raw)
    return raw


def untyped_value(raw: str) -> object:
    """A value of no known type: JSON if it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_option(text: str, method: str | None = None) -> tuple[str, object]:
    """`OPTION=VALUE`, typed by `method`'s option defaults when a method is given."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SpecError(f"an option is OPTION=VALUE, not {text!r}")
    if method is None:
        return key, untyped_value(raw)
    from vllm_compact.am.methods import method_options

    defaults = method_options(method)
    if key not in defaults:
        raise SpecError(f"method {method!r} has no option {key!r}; options: {', '.join(sorted(defaults))}")
    return key, typed_value(key, raw, defaults[key])


def parse_options(pairs: list[str], method: str | None = None) -> dict[str, object]:
    return dict(parse_option(pair, method) for pair in pairs)


def parse_spec(text: str, *, ratio_required: bool = True, extra_keys: tuple[str, ...] = (),
               flags: tuple[str, ...] = ()) -> MethodSpec:
    """`METHOD[:RATIO][:OPTION=VALUE...][:WORD...]`; the ratio may be left out only if not `ratio_required`."""
    from vllm_compact.am.methods import METHODS

    method, *parts = text.split(":")
    if method not in METHODS:
        raise SpecError(f"unknown method {method!r} in {text!r}; methods: {', '.join(METHODS)}")
    ratio = None
    if parts and "=" not in parts[0] and parts[0] not in flags:
        ratio = _number(parts.pop(0))
        if not ratio >= 1.0:
            raise SpecError(f"the ratio of {text!r} must be >= 1")
    elif ratio_required:
        raise SpecError(f"{text!r} has no ratio (METHOD:RATIO[:OPTION=VALUE...])")
    options, extras, words = {}, {}, set()
    for part in filter(None, parts):
        if "=" not in part:
            if part not in flags:
                raise SpecError(f"unknown word {part!r} in {text!r}" + (f"; allowed: {', '.join(flags)}" if flags
                                                                         else ""))
            words.add(part)
        elif part.partition("=")[0] in extra_keys:
            key, _, value = part.partition("=")
            extras[key] = value
        else:
            key, value = parse_option(part, method)
            options[key] = value
    return MethodSpec(method, ratio, options, extras, frozenset(words))
