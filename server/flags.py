"""The `--kv-compaction*` flags of `vllm-compact serve`: definition, fast validation, readable errors.

Validation needs only pydantic, so `check_compaction_argv` runs before vLLM is even imported (importing vLLM's
argument parser alone takes many seconds): a bad value exits at once with code 2 and a message that names the
flag (or config-file field), the value and what is allowed.
"""

from __future__ import annotations

import argparse
import re
from typing import Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ValidationError

from vllm_compact.config import CompactionConfig, load_config
from vllm_compact.head_table import (
    FORMAT,
    UNIFORM,
    HeadTableError,
    check_table_shape,
    model_head_shape,
    read_head_table,
)

CONFIG_FLAG = "--kv-compaction-config"

# flag -> config field; every flag is optional and overrides --kv-compaction-config.
COMPACTION_FLAGS: dict[str, str] = {
    "--kv-compaction-ratio": "ratio",
    "--kv-compaction-trigger": "trigger_tokens",
    "--kv-compaction-recent-window": "recent_window_tokens",
    "--kv-compaction-protected-initial": "protected_initial_tokens",
    "--kv-compaction-method": "method",
    "--kv-compaction-head-budgets": "head_budget_file",
    "--kv-compaction-max-reference-queries": "max_reference_queries",
    "--kv-compaction-value-ridge": "value_ridge",
    "--kv-compaction-distinct-share": "distinct_share",
    "--kv-compaction-layers-per-step": "layers_per_step",
    "--kv-compaction-pool-watermark": "pool_watermark",
    "--kv-compaction-workspace-mib": "workspace_mib",
}
# Boolean fields get --flag / --no-flag.
COMPACTION_SWITCHES: dict[str, str] = {
    "--kv-compaction-memory-pressure": "memory_pressure",
    "--kv-compaction-recompact": "recompact",
    "--kv-compaction-during-prefill": "compact_during_prefill",
    "--kv-compaction-refit-values": "refit_values",
}


class CompactionFlagError(ValueError):
    """A `--kv-compaction*` value that the server must refuse before starting."""


def add_compaction_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "KV compaction (vllm-compact)",
        "Attention Matching compaction of running requests' KV caches. Off unless --kv-compaction is given.",
    )
    group.add_argument("--kv-compaction", action="store_true", default=False, help="Enable KV compaction.")
    group.add_argument(
        CONFIG_FLAG,
        default=None,
        help="Compaction settings as a JSON object or a path to a JSON file; individual flags below override it.",
    )
    fields = CompactionConfig.model_fields
    for flag, field in COMPACTION_FLAGS.items():
        info = fields[field]
        group.add_argument(
            flag, dest=f"kvc_{field}", default=None,
            help=f"{info.description} Allowed: {allowed_values(field)}. (default: {info.default})",
        )
    for flag, field in COMPACTION_SWITCHES.items():
        info = fields[field]
        group.add_argument(
            flag, dest=f"kvc_{field}", default=None, action=argparse.BooleanOptionalAction,
            help=f"{info.description} (default: {info.default})",
        )


def compaction_config_from_args(args: argparse.Namespace) -> CompactionConfig:
    """The server's config from parsed flags; raises CompactionFlagError with a readable message."""
    fields = [*COMPACTION_FLAGS.values(), *COMPACTION_SWITCHES.values()]
    overrides = {field: getattr(args, f"kvc_{field}") for field in fields}
    given = any(v is not None for v in overrides.values()) or args.kv_compaction_config
    if given and not args.kv_compaction:
        raise CompactionFlagError("--kv-compaction-* settings were given without --kv-compaction (which enables it)")
    try:
        return load_config(args.kv_compaction_config, enabled=args.kv_compaction or None, **overrides)
    except ValidationError as e:
        flags = {field: flag for flag, field in {**COMPACTION_FLAGS, **COMPACTION_SWITCHES}.items()
                 if overrides[field] is not None}
        raise CompactionFlagError(describe_validation_error(e, flags)) from None
    except OSError as e:
        raise CompactionFlagError(f"{CONFIG_FLAG}: cannot read {e.filename!r}: {e.strerror}") from None
    except ValueError as e:  # not JSON / not an object
        source = args.kv_compaction_config
        shown = source if len(source) < 200 else source[:200] + "..."
        problem = str(e).removeprefix(f"{CONFIG_FLAG} ")  # load_config's messages start with the flag
        raise CompactionFlagError(
            f"{CONFIG_FLAG}={shown!r} {problem}; allowed: a JSON object such as '{{\"ratio\": 8}}' or a path to a "
            "file holding one"
        ) from None


def check_compaction_argv(argv: list[str]) -> CompactionConfig:
    """Validate only our flags in a raw command line (vLLM's flags are left to vLLM's parser)."""
    parser = argparse.ArgumentParser(prog="vllm-compact serve", add_help=False, allow_abbrev=False)
    add_compaction_args(parser)
    args, _ = parser.parse_known_args(_dashed_compaction_flags(argv))
    return compaction_config_from_args(args)


def model_from_argv(argv: list[str]) -> str | None:
    """The model of a `serve` command line without vLLM's parser: the leading positional, or `--model`."""
    if argv and not argv[0].startswith("-"):
        return argv[0]
    for i, token in enumerate(argv):
        if token == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--model="):
            return token.partition("=")[2]
    return None


def local_model_dir(model: str | None) -> str | None:
    """A folder holding the model's config.json, without fetching anything: a path, a fetched model of
    `vllm-compact models`, or a Hugging Face id already in the local hub cache. None when it is not known yet."""
    import os

    if not model:
        return None
    if os.path.isdir(model):
        return model
    from vllm_compact.models import registry

    if model in registry.MODELS:
        return str(registry.model_path(model)) if registry.is_fetched(model) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a hub id, or no hub library: the engine checks the table when it starts
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def check_head_budgets(config: CompactionConfig, model_dir: str | None, argv: list[str]) -> None:
    """The head-budget table against the model's (layers, KV heads), read from its config.json; nothing to do
    without a table or while the model's folder is not known (the engine checks again when it starts)."""
    if config.head_budget_file in (None, UNIFORM) or model_dir is None:
        return
    shape = model_head_shape(model_dir)
    if shape is None:
        return
    given = any(t.split("=")[0] in ("--kv-compaction-head-budgets", "--kv_compaction_head_budgets") for t in argv)
    where = "--kv-compaction-head-budgets" if given else f"{CONFIG_FLAG} field 'head_budget_file'"
    try:
        check_table_shape(config.head_budget_file, read_head_table(config.head_budget_file), *shape)
    except HeadTableError as e:
        raise CompactionFlagError(f"{where}: {e}; allowed: {allowed_values('head_budget_file')}") from None


def check_supported(model_dir: str | None, argv: list[str], args: argparse.Namespace | None = None) -> None:
    """What KV compaction does not support (core/support.py) in the model's config.json and, once vLLM's parser
    has run (`args`), in the parsed serve flags (parallelism, --kv-cache-dtype): a CompactionFlagError naming each,
    before vLLM loads the model. The engine checks again on the configuration it resolves."""
    from vllm_compact.core.support import (
        PARALLEL_SETTINGS,
        kv_cache_dtype_refusals,
        model_refusals,
        parallel_refusals,
        refusal_message,
    )
    from vllm_compact.head_table import read_model_config

    reasons = []
    if args is not None:
        reasons += parallel_refusals(**{name: getattr(args, name, None) for _, name, _ in PARALLEL_SETTINGS})
        reasons += kv_cache_dtype_refusals(getattr(args, "kv_cache_dtype", None))
        disable_sliding_window = bool(getattr(args, "disable_sliding_window", False))
    else:
        disable_sliding_window = any(t in ("--disable-sliding-window", "--disable_sliding_window") for t in argv)
    reasons += model_refusals(read_model_config(model_dir), disable_sliding_window)
    if reasons:
        raise CompactionFlagError(refusal_message(reasons))


def _dashed_compaction_flags(argv: list[str]) -> list[str]:
    """vLLM's parser accepts `--flag_name` for `--flag-name`; accept the same spelling of our flags."""
    out = []
    for token in argv:
        name, eq, value = token.partition("=")
        if name.startswith(("--kv_compaction", "--no_kv_compaction", "--no-kv_compaction")):
            token = "--" + name[2:].replace("_", "-") + eq + value
        out.append(token)
    return out


# ---- messages ---------------------------------------------------------------------------------------------------


def allowed_values(field: str) -> str:
    """What a field accepts, in words, from its type and bounds."""
    info = CompactionConfig.model_fields[field]
    annotation = info.annotation
    unset = ""
    if type(None) in get_args(annotation) and field != "head_budget_file":  # optional: the type it holds when set
        annotation = next(a for a in get_args(annotation) if a is not type(None))
        unset = " (or unset)"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(annotation))
    if annotation is bool:
        return "true or false"
    if field == "head_budget_file":
        return (f"a path to an existing JSON file {FORMAT}, one row per layer and one column per KV head of the model, "
                f"or {UNIFORM!r} (uniform budgets; unset: the table shipped for the model, if any)")
    noun = {int: "an integer", float: "a number"}.get(annotation, str(annotation))
    bounds = []
    for meta in info.metadata:
        for cls, op, attr in ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt")):
            if isinstance(meta, cls):
                bounds.append(f"{op} {getattr(meta, attr)}")
    return f"{noun} {' and '.join(bounds)}".strip() + unset


def describe_validation_error(err: ValidationError, flags: dict[str, str]) -> str:
    """One line per problem: where the value came from (flag or config field), the value, why, what is allowed."""
    lines = []
    for e in err.errors():
        # pydantic's literal message already lists the choices, which "allowed" repeats
        msg = "not one of the choices" if e["type"] == "literal_error" else e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a whole-model check (e.g. head_budget_file exists): the message names the field
            # the field the message names first (word by word: `ratio` is not part of another field's name)
            named = sorted((m.start(), f) for f in CompactionConfig.model_fields
                           for m in [re.search(rf"\b{f}\b", msg)] if m)
            named = [f for _, f in named]
            where = f"{flags[named[0]]}: " if named and named[0] in flags else ""
            allowed = f"; allowed: {allowed_values(named[0])}" if named else ""
            lines.append(f"{where}{msg}{allowed}")
            continue
        field = str(e["loc"][0])
        where = flags.get(field, f"{CONFIG_FLAG} field {field!r}")
        if field not in CompactionConfig.model_fields:
            allowed = "known fields: " + ", ".join(CompactionConfig.model_fields)
            lines.append(f"{where}: unknown compaction setting; {allowed}")
            continue
        lines.append(f"{where}={e.get('input')!r}: {msg}; allowed: {allowed_values(field)}")
    return "\n".join(lines)
