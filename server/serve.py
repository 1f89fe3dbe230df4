"""`vllm-compact serve MODEL [vllm serve flags] [--kv-compaction ...]`: vLLM's OpenAI server with compaction.

Our flags are validated by the one pydantic config model BEFORE vLLM is imported or loads anything: a bad value
exits with code 2 and a message naming the flag, the value and what is allowed. With --kv-compaction, what compaction
does not support (parallelism, a KV cache dtype other than the model's, a model with sliding window attention,
soft-capping, sinks or hybrid layers: core/support.py) exits 2 too, naming the flag or config.json field, before the
model loads. Everything else is `vllm serve`:
the same parser, the same dispatch (single or multiple API servers, headless, gRPC).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from vllm_compact.config import CompactionConfig
from vllm_compact.core.stats_file import STATS_PATH_ENV
from vllm_compact.server.flags import (
    CompactionFlagError,
    add_compaction_args,
    check_compaction_argv,
    check_head_budgets,
    check_supported,
    compaction_config_from_args,
    local_model_dir,
    model_from_argv,
)

MIDDLEWARE = "vllm_compact.server.compaction_api.CompactionMiddleware"


def resolve_model(model: str | None) -> str | None:
    """Our model names (`smollm2-135m`, `tiny`, ...) resolve to their converted folder, fetched on first use."""
    if model is None or os.path.exists(model):
        return model
    from vllm_compact.models import registry

    if model in registry.MODELS:
        return str(registry.ensure_model(model))
    return model


def served_model_names(requested: str, resolved: str, given: list[str] | str | None) -> list[str] | str | None:
    """A registry name the user served (`smollm2-135m`) is also the name clients may send, beside its folder;
    an explicit --served-model-name wins."""
    if given is not None or requested == resolved:
        return given
    return [requested, resolved]


def with_default_head_budgets(config: CompactionConfig, model: str | None, model_dir: str | None) -> CompactionConfig:
    """head_budget_file unset: the table shipped for the model (by registry name or config.json fingerprint) is
    written into the config, so the engine, /v1/compaction/config and the stats file all name it."""
    from vllm_compact.head_table import read_model_config, resolve_head_budgets

    path, how = resolve_head_budgets(config.head_budget_file, model, read_model_config(model_dir))
    print(f"vllm-compact serve: head budgets: {how}", file=sys.stderr)
    if config.head_budget_file is None and path is not None:
        return config.model_copy(update={"head_budget_file": path})
    return config


def _build_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="vllm-compact serve",
        description="vLLM's OpenAI-compatible server with Attention Matching KV compaction. "
        "MODEL is a path, a Hugging Face folder, or one of `vllm-compact models list`. "
        "Every `vllm serve` flag works here.",
    )
    parser = make_arg_parser(parser)
    add_compaction_args(parser)
    return parser


def install_http_extensions(args: argparse.Namespace) -> str:
    """Per-request validation, /v1/compaction/*, usage.kv_compaction and the Prometheus collector, through vLLM's
    own --middleware option; the stats file the scheduler writes gets a fresh private folder. Returns the folder."""
    stats_dir = tempfile.mkdtemp(prefix="vllm-compact-stats-")
    os.environ[STATS_PATH_ENV] = os.path.join(stats_dir, "stats.json")
    args.middleware = [*(args.middleware or []), MIDDLEWARE]
    return stats_dir


def _fail(message: str) -> int:
    print(f"vllm-compact serve: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    try:
        config = check_compaction_argv(argv)  # fast: before importing vLLM
        check_head_budgets(config, local_model_dir(model_from_argv(argv)), argv)
        if config.enabled:  # a model compaction does not support (sliding window, ...), from its config.json
            check_supported(local_model_dir(model_from_argv(argv)), argv)
    except CompactionFlagError as e:
        return _fail(str(e))

    from vllm_compact.vllm_compat import patch_vllm_version

    patch_vllm_version()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _build_parser().parse_args(argv)
    try:
        # Again on the parsed flags: vLLM's parser may have added some (e.g. from a --config YAML file).
        config: CompactionConfig = compaction_config_from_args(args)
    except CompactionFlagError as e:
        return _fail(str(e))

    from vllm_compact.server.memory import apply_cpu_kv_cache_default

    apply_cpu_kv_cache_default(args, argv)
    requested = args.model_tag or args.model
    if args.model_tag is not None:
        args.model_tag = resolve_model(args.model_tag)
        args.model = args.model_tag
        args.served_model_name = served_model_names(requested, args.model_tag, args.served_model_name)
    try:
        # The model is known now (fetched, from --config, ...); the model loads only in ServeSubcommand.cmd.
        check_head_budgets(config, local_model_dir(args.model), argv)
        if config.enabled:  # and vLLM's own flags are parsed: parallelism, --kv-cache-dtype
            check_supported(local_model_dir(args.model), argv, args)
    except CompactionFlagError as e:
        return _fail(str(e))
    if config.enabled:
        config = with_default_head_budgets(config, requested, local_model_dir(args.model))
    stats_dir = None
    if config.enabled:
        from vllm_compact.integration.settings import apply_to_serve_args

        try:
            apply_to_serve_args(args, config)
        except RuntimeError as e:  # compaction is not available on this platform
            return _fail(str(e))
        stats_dir = install_http_extensions(args)

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    validate_parsed_serve_args(args)
    try:
        ServeSubcommand.cmd(args)
    finally:
        if stats_dir is not None:
            shutil.rmtree(stats_dir, ignore_errors=True)
    return 0
