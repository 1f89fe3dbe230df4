"""The one compaction config model: server flags, JSON config files and per-request overrides all go through it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_compact.am.methods import METHODS
from vllm_compact.head_table import UNIFORM, read_head_table

ENV_VAR = "VLLM_COMPACT_CONFIG"
MAX_RATIO = 1000.0

MethodName = Literal[METHODS]  # the method registry is the one list of methods


class CompactionConfig(BaseModel):
    """Settings of KV compaction. Defaults work out of the box for the default model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(False, description="Compact the KV cache of running requests.")
    method: MethodName = Field("am-highest-attention", description="Compaction method.")
    ratio: float = Field(10.0, ge=1.0, le=MAX_RATIO, description="Target compaction ratio (original / compact tokens).")
    trigger_tokens: int = Field(
        1024, ge=1, description="Compact once a request's uncompacted tail (outside the protected window) reaches this many tokens."
    )
    protected_initial_tokens: int = Field(
        4, ge=0, description="Leading tokens (attention sinks, template) that are never compacted."
    )
    recent_window_tokens: int = Field(
        256, ge=0, description="Most recent tokens that are never compacted; their queries are the reference queries."
    )
    max_reference_queries: int | None = Field(
        None,
        ge=1,
        description="Reference queries kept per request: the queries of its last this many tokens (every query "
        "head, every layer), at most recent_window_tokens. Fewer: less memory outside the KV pool and a faster "
        "fit, on fewer queries. Unset: the whole recent window.",
    )
    refit_values: bool = Field(
        False,
        description="Refit the compact values by least squares on the reference queries (AM's C2; am-* methods). "
        "Off: the kept keys keep their original values and only beta is fitted.",
    )
    value_ridge: float = Field(
        1e-3, ge=0.0, description="Relative ridge of the value least-squares fit; only with refit_values."
    )
    distinct_share: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Share of each head's budget kept for the keys least like the span's other keys (RoPE undone), "
        "chosen without any query, so that what a later question asks about can survive a compaction made before "
        "it. The rest goes to the keys the reference queries attend to most. Used by am-highest-attention; the "
        "other methods keep their own selection.",
    )
    head_budget_file: str | None = Field(
        None,
        description="JSON table of per-head budget proportions; unset: the table shipped for the model "
        "(smollm2-135m, qwen2.5-0.5b; `vllm-compact calibrate` writes others), uniform for other models; "
        "'uniform' forces uniform budgets.",
    )
    pool_watermark: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Compact a request that passed trigger_tokens only while the KV pool's free pages are below this "
        "share of the pool: a compaction costs about a prefill of its span and pays only when memory is short. "
        "1: compact every request as soon as it passes the trigger. Under memory pressure compaction happens "
        "whatever this says. A request may ask for a higher value (kv_compaction_pool_watermark).",
    )
    layers_per_step: int = Field(
        4,
        ge=0,
        description="Layers of compaction work per engine step, all requests together: a compaction spreads over "
        "several steps (the request attends over its full pages until every layer is done) instead of stalling "
        "every co-scheduled request for the whole solve. 0: a compaction runs whole in one step. Under memory "
        "pressure a compaction always runs whole (the step needs its pages).",
    )
    workspace_mib: int = Field(
        128,
        ge=16,
        description="Memory a compaction step may use outside the KV pool (the pages it reads, the solve's buffers), "
        "in MiB. Taken from the KV cache budget at startup (the pool is this much smaller than the budget, so the "
        "server's memory stays within what it was given); a step's solve is split to stay within it.",
    )
    memory_pressure: bool = Field(True, description="Compact instead of preempting when the KV pool runs out of pages.")
    recompact: bool = Field(True, description="Re-compact an already compacted segment (with its beta) as a request grows.")
    compact_during_prefill: bool = Field(
        False,
        description="Compact a request whose prompt is still being prefilled; otherwise only under memory pressure, "
        "so that the prompt's last tokens (usually the question) are among the reference queries.",
    )

    @model_validator(mode="after")
    def _settings_that_take_effect(self) -> CompactionConfig:
        # A setting accepted and then ignored would look like it worked: refuse it by name.
        if self.max_reference_queries is not None and self.max_reference_queries > self.recent_window_tokens:
            raise ValueError(
                f"max_reference_queries ({self.max_reference_queries}) must be at most recent_window_tokens "
                f"({self.recent_window_tokens}): the reference queries are the recent window's"
            )
        if not self.refit_values and self.value_ridge != type(self).model_fields["value_ridge"].default:
            raise ValueError(
                f"value_ridge ({self.value_ridge:g}) applies only with refit_values; without it the compact values "
                "are the kept keys' own and nothing is fitted (set refit_values true, or leave value_ridge unset)"
            )
        return self

    @property
    def reference_queries(self) -> int:
        """Tokens whose queries a request keeps as reference queries (its reservoir's capacity, at least 1)."""
        window = self.recent_window_tokens
        return max(1, window if self.max_reference_queries is None else min(window, self.max_reference_queries))

    @field_validator("head_budget_file")
    @classmethod
    def _check_budget_file(cls, value: str | None) -> str | None:
        # Contents checked here (JSON, shape, values); the shape against the model where the model is known.
        if value is not None and value != UNIFORM:
            if not Path(value).is_file():
                raise ValueError(f"head_budget_file {value!r} does not exist")
            read_head_table(value)
        return value

    # Per-request narrowing: vllm_compact.core.request_overrides.request_config (the one path).

    def method_options(self, method: str) -> dict[str, object]:
        """The options this config sets on a fitting method (eviction baselines keep their own defaults)."""
        from vllm_compact.am.methods import method_class, method_options

        if not method_class(method).fits:
            return {}
        options = {"value_ridge": self.value_ridge, "refit_values": self.refit_values,
                   "distinct_share": self.distinct_share}
        known = method_options(method)
        return {name: value for name, value in options.items() if name in known}

    def to_env(self) -> str:
        return self.model_dump_json()


def load_config(source: str | None, **overrides) -> CompactionConfig:
    """Build a config from a JSON string or a path to a JSON file, then apply flag overrides (None = unset)."""
    data: dict = {}
    if source:
        text = Path(source).read_text() if not source.lstrip().startswith("{") and Path(source).is_file() else source
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-compaction-config is neither a JSON object nor a readable JSON file: {e}") from e
        if not isinstance(data, dict):
            raise ValueError("--kv-compaction-config must be a JSON object")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return CompactionConfig.model_validate(data)


def config_from_env() -> CompactionConfig | None:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    return CompactionConfig.model_validate_json(raw)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"invalid compaction setting {field}={e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)
