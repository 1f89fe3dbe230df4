"""`vllm-compact serve MODEL [vllm serve flags] [--kv-compaction ...]`: vLLM's OpenAI server with compaction.

Our flags are validated by the one pydantic config model BEFORE vLLM loads anything: a bad value exits with code 2
and a message naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from vllm_compact.config import CompactionConfig, format_validation_error, load_config

# flag -> config field; every flag is optional and overrides --kv-compaction-config.
COMPACTION_FLAGS: dict[str, str] = {
    "--kv-compaction-ratio": "ratio",
    "--kv-compaction-trigger": "trigger_tokens",
    "--kv-compaction-recent-window": "recent_window_tokens",
    "--kv-compaction-protected-initial": "protected_initial_tokens",
    "--kv-compaction-method": "method",
    "--kv-compaction-query-source": "query_source",
    "--kv-compaction-head-budgets": "head_budget_file",
}


def add_compaction_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "KV compaction (vllm-compact)",
        "Attention Matching compaction of running requests' KV caches. Off unless --kv-compaction is given.",
    )
    group.add_argument("--kv-compaction", action="store_true", default=False, help="Enable KV compaction.")
    group.add_argument(
        "--kv-compaction-config",
        default=None,
        help="Compaction settings as a JSON object or a path to a JSON file; individual flags below override it.",
    )
    fields = CompactionConfig.model_fields
    for flag, field in COMPACTION_FLAGS.items():
        info = fields[field]
        group.add_argument(flag, dest=f"kvc_{field}", default=None, help=f"{info.description} (default: {info.default})")


def compaction_config_from_args(args: argparse.Namespace) -> CompactionConfig:
    overrides = {field: getattr(args, f"kvc_{field}") for field in COMPACTION_FLAGS.values()}
    any_flag = any(v is not None for v in overrides.values()) or args.kv_compaction_config
    if any_flag and not args.kv_compaction:
        raise ValueError("--kv-compaction-* settings were given without --kv-compaction")
    return load_config(args.kv_compaction_config, enabled=args.kv_compaction or None, **overrides)


def resolve_model(model: str | None) -> str | None:
    """Our model names (`smollm2-135m`, `tiny`, ...) resolve to their converted folder, fetched on first use."""
    if model is None or os.path.exists(model):
        return model
    from vllm_compact.models import registry

    if model in registry.MODELS:
        return str(registry.ensure_model(model))
    return model


def main(argv: list[str]) -> int:
    from vllm_compact.vllm_compat import patch_vllm_version

    patch_vllm_version()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="vllm-compact serve",
        description="vLLM's OpenAI-compatible server with Attention Matching KV compaction. "
        "MODEL is a path, a Hugging Face folder, or one of `vllm-compact models list`.",
    )
    parser = make_arg_parser(parser)
    add_compaction_args(parser)
    args = parser.parse_args(argv)

    try:
        config = compaction_config_from_args(args)
    except ValidationError as e:
        print(f"vllm-compact serve: {format_validation_error(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"vllm-compact serve: {e}", file=sys.stderr)
        return 2

    if args.model_tag is not None:
        args.model_tag = resolve_model(args.model_tag)
        args.model = args.model_tag
    if config.enabled:
        from vllm_compact.engine.settings import apply_to_serve_args

        apply_to_serve_args(args, config)

    cli_env_setup()
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
    return 0
