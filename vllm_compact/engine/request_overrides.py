"""Per-request compaction settings carried in `SamplingParams.extra_args` (vLLM's `vllm_xargs` request field).

vLLM 0.32 types `vllm_xargs` as `dict[str, str | int | float | list[str | int | float]]`: no nested objects, and JSON
booleans arrive as 0/1. So the settings are flat keys:

    {"vllm_xargs": {"kv_compaction_enabled": false, "kv_compaction_ratio": 20, "kv_compaction_method": "am-omp"}}

`request_config(server_config, extra_args)` is the one entry point, used alike by the API server (to answer a bad
value with HTTP 400) and by the scheduler (to get the request's settings): it parses the keys
(`request_overrides`) and narrows the server's config with them (a request may only turn compaction off or make it
stricter). Other `extra_args` keys belong to other extensions and are ignored; an unknown key with our
`kv_compaction` prefix is an error, so a typo never passes silently.
"""

from __future__ import annotations

import math
from typing import Any, get_args

from pydantic import ValidationError

from vllm_compact.config import CompactionConfig, MethodName, format_validation_error

KEY_PREFIX = "kv_compaction"
ENABLED_KEY = "kv_compaction_enabled"
RATIO_KEY = "kv_compaction_ratio"
METHOD_KEY = "kv_compaction_method"

METHODS: tuple[str, ...] = get_args(MethodName)
_TRUE_STRINGS = ("true", "1", "yes", "on")
_FALSE_STRINGS = ("false", "0", "no", "off")


class RequestOverrideError(ValueError):
    """A bad per-request compaction value; `key` is the offending `vllm_xargs` key when there is one."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


def _parse_enabled(value: Any) -> bool:
    # bool first: JSON true/false from a direct engine caller; 0/1 from the OpenAI server's vllm_xargs.
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    raise RequestOverrideError(ENABLED_KEY, f"{ENABLED_KEY}={value!r} is not a boolean; allowed: true, false, 0 or 1")


def _parse_ratio(value: Any) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise RequestOverrideError(
            RATIO_KEY, f"{RATIO_KEY}={value!r} is not a number; allowed: a number >= 1 (original / compact tokens)"
        )
    return number


def _parse_method(value: Any) -> str:
    if isinstance(value, str) and value in METHODS:
        return value
    raise RequestOverrideError(
        METHOD_KEY, f"{METHOD_KEY}={value!r} is not a compaction method; allowed: {', '.join(METHODS)}"
    )


_PARSERS = {ENABLED_KEY: ("enabled", _parse_enabled), RATIO_KEY: ("ratio", _parse_ratio), METHOD_KEY: ("method", _parse_method)}


def request_overrides(extra_args: dict | None) -> dict:
    """The CompactionConfig fields a request asks to narrow, e.g. {"enabled": False} or {"ratio": 20.0}.

    Raises RequestOverrideError (a ValueError) naming the key, the value and what is allowed when a `kv_compaction*` key is unknown or its
    value has the wrong type. Whether the value is allowed on this server is `CompactionConfig.narrowed`'s check.
    """
    if not extra_args:
        return {}
    overrides: dict = {}
    for key, value in extra_args.items():
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
            continue
        if key not in _PARSERS:
            raise RequestOverrideError(
                key, f"unknown per-request compaction key {key!r}; allowed: {', '.join(_PARSERS)}"
            )
        field, parse = _PARSERS[key]
        overrides[field] = parse(value)
    return overrides


def request_config(server: CompactionConfig, extra_args: dict | None) -> CompactionConfig:
    """The compaction settings of one request: the server's, narrowed by the request's `kv_compaction*` keys.

    Every failure is a RequestOverrideError (a ValueError) with a message fit for an HTTP 400.
    """
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    if overrides.get("enabled") is False:
        # Off is always allowed; the other keys are still checked for type above but not against the server.
        return server.model_copy(update={"enabled": False})
    if overrides.get("enabled") and not server.enabled:
        raise RequestOverrideError(
            ENABLED_KEY, f"{ENABLED_KEY}=true: compaction is disabled on this server; a request can only turn it off"
        )
    if overrides.get("ratio", server.ratio) < server.ratio:
        raise RequestOverrideError(
            RATIO_KEY,
            f"{RATIO_KEY}={overrides['ratio']} is looser than this server's ratio {server.ratio}; "
            f"allowed: a number >= {server.ratio} (a request may only compact more)",
        )
    try:
        return server.narrowed(overrides)
    except ValidationError as e:
        key = next((_key_of_field(str(err["loc"][0])) for err in e.errors() if err["loc"]), None)
        raise RequestOverrideError(key, _per_request_message(format_validation_error(e))) from None


def _key_of_field(field: str) -> str | None:
    return next((key for key, (f, _) in _PARSERS.items() if f == field), None)


def _per_request_message(message: str) -> str:
    # format_validation_error names config fields; name the request keys instead.
    for key, (field, _) in _PARSERS.items():
        message = message.replace(f"setting {field}=", f"setting {key}=")
    return message.replace("invalid compaction setting", "invalid per-request compaction setting")
