"""Per-request compaction settings carried in `SamplingParams.extra_args` (vLLM's `vllm_xargs` request field).

vLLM 0.32 types `vllm_xargs` as `dict[str, str | int | float | list[str | int | float]]`: no nested objects, and JSON
booleans arrive as 0/1. So the settings are flat keys:

    {"vllm_xargs": {"kv_compaction_enabled": false, "kv_compaction_ratio": 20, "kv_compaction_method": "am-omp"}}

`request_config(server_config, extra_args)` is the one validation path. It runs in three places, always the same
code: the API server's middleware (on the raw JSON body, so it still sees a JSON `true` where a number goes before
vLLM's pydantic model turns it into 1), vLLM's per-request admission hook in the front-end process
(`engine.request_validation`, which covers the offline `LLM` API and every route), and the scheduler (to get the
request's settings). A request may only turn compaction off or make it stricter.

What is refused (a RequestOverrideError naming the key, the value and what is allowed):
- an `extra_args` / `vllm_xargs` that is not an object;
- any key that looks like ours (`kv_compaction...` in any case, with `-` or `_`) but is not exactly one of the keys
  below, so a typo or `KV_Compaction_Ratio` never passes silently;
- a ratio that is not a finite JSON number (strings, booleans, lists, null, NaN, 1e400, integers too large for a
  float), outside [1, MAX_RATIO], or looser than the server's;
- an `enabled` that is not a boolean (or the 0/1 vLLM makes of one), or true on a server without compaction;
- a method that is not in the method registry;
- a pool watermark that is not a number in [0, 1], or lower than the server's.
Other `extra_args` keys belong to other extensions and are ignored.
"""

from __future__ import annotations

import math
import re
from typing import Any, get_args

from vllm_compact.config import MAX_RATIO, CompactionConfig, MethodName

KEY_PREFIX = "kv_compaction"
ENABLED_KEY = "kv_compaction_enabled"
RATIO_KEY = "kv_compaction_ratio"
METHOD_KEY = "kv_compaction_method"
WATERMARK_KEY = "kv_compaction_pool_watermark"
KEYS = (ENABLED_KEY, RATIO_KEY, METHOD_KEY, WATERMARK_KEY)

METHODS: tuple[str, ...] = get_args(MethodName)


class RequestOverrideError(ValueError):
    """A bad per-request compaction value; `key` is the offending `vllm_xargs` key (None: `vllm_xargs` itself)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key

    @property
    def param(self) -> str:
        """The request field to name in an HTTP 400 (`param` of vLLM's error JSON)."""
        return f"vllm_xargs.{self.key}" if self.key else "vllm_xargs"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"  # repr of a huge int can even raise (int_max_str_digits)
    try:
        text = repr(value)
    except ValueError:  # a huge int nested in a list
        text = f"<{_kind(value)}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_enabled(value: Any) -> bool:
    # bool: JSON true/false in the raw body or from an offline caller; 0/1: what vLLM's vllm_xargs makes of them.
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise RequestOverrideError(
        ENABLED_KEY, f"{ENABLED_KEY}={_shown(value)} is not a boolean; allowed: true, false, 0 or 1"
    )


def _parse_number(key: str, value: Any, low: float, high: float, meaning: str) -> float:
    """A finite JSON number in [low, high] (booleans, strings, NaN and integers beyond float range refused)."""
    allowed = f"allowed: a number >= {low} and <= {high} ({meaning})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestOverrideError(key, f"{key}={_shown(value)} is {_kind(value)}, not a number; {allowed}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise RequestOverrideError(key, f"{key}={_shown(value)} is not a finite number; {allowed}")
    if not low <= number <= high:
        raise RequestOverrideError(key, f"{key}={_shown(value)} is out of range; {allowed}")
    return number


def _parse_ratio(value: Any) -> float:
    return _parse_number(RATIO_KEY, value, 1.0, MAX_RATIO, "original / compact tokens")


def _parse_watermark(value: Any) -> float:
    return _parse_number(WATERMARK_KEY, value, 0.0, 1.0, "share of the KV pool's pages that are free")


def _parse_method(value: Any) -> str:
    if isinstance(value, str) and value in METHODS:
        return value
    raise RequestOverrideError(
        METHOD_KEY, f"{METHOD_KEY}={_shown(value)} is not a compaction method; allowed: {', '.join(METHODS)}"
    )


_PARSERS = {ENABLED_KEY: ("enabled", _parse_enabled), RATIO_KEY: ("ratio", _parse_ratio),
            METHOD_KEY: ("method", _parse_method), WATERMARK_KEY: ("pool_watermark", _parse_watermark)}


def _normal(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


_NORMAL_PREFIX = _normal(KEY_PREFIX)
_NORMAL_KEYS = {_normal(key): key for key in KEYS}


def is_compaction_key(key: Any) -> bool:
    """Whether a key is (or looks like, in another case or spelling) one of ours."""
    return isinstance(key, str) and _normal(key).startswith(_NORMAL_PREFIX)


def _unknown_key(key: str) -> RequestOverrideError:
    meant = _NORMAL_KEYS.get(_normal(key))
    hint = f" (keys are exact and lower case: did you mean {meant!r}?)" if meant else ""
    return RequestOverrideError(
        key, f"unknown per-request compaction key {_shown(key)}{hint}; allowed: {', '.join(KEYS)}"
    )


def request_overrides(extra_args: Any) -> dict:
    """The CompactionConfig fields a request asks to narrow, e.g. {"enabled": False} or {"ratio": 20.0}.

    Raises RequestOverrideError when `extra_args` is not a dict, a compaction-looking key is not one of ours, or a
    value has the wrong type or range. Whether the value is allowed on this server is `request_config`'s check.
    """
    if extra_args is None:
        return {}
    if not isinstance(extra_args, dict):
        raise RequestOverrideError(
            None, f"vllm_xargs must be an object of extension arguments, got {_kind(extra_args)}: {_shown(extra_args)}"
        )
    overrides: dict = {}
    for key, value in extra_args.items():
        if not is_compaction_key(key):
            continue
        if key not in _PARSERS:
            raise _unknown_key(key)
        field, parse = _PARSERS[key]
        overrides[field] = parse(value)
    return overrides


def request_config(server: CompactionConfig, extra_args: Any) -> CompactionConfig:
    """The compaction settings of one request: the server's, narrowed by the request's `kv_compaction_*` keys.

    Every failure is a RequestOverrideError (a ValueError) with a message fit for an HTTP 400; `.param` names the
    request field.
    """
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    if overrides.get("enabled") is False:
        # Off is always allowed; the other keys were still checked above but not against the server.
        return server.model_copy(update={"enabled": False})
    if overrides.get("enabled") and not server.enabled:
        raise RequestOverrideError(
            ENABLED_KEY, f"{ENABLED_KEY}=true: compaction is disabled on this server; a request can only turn it off"
        )
    for field, key, what in (("ratio", RATIO_KEY, "compact more"), ("pool_watermark", WATERMARK_KEY, "compact sooner")):
        asked, allowed = overrides.get(field), getattr(server, field)
        if asked is not None and asked < allowed:
            high = MAX_RATIO if field == "ratio" else 1.0
            raise RequestOverrideError(
                key, f"{key}={asked} is looser than this server's {field} {allowed}; allowed: a number >= {allowed} "
                f"and <= {high} (a request may only {what})",
            )
    # Every field was checked above against the config model's own types and bounds: no re-validation per request.
    return server.model_copy(update=overrides)
