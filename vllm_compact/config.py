"""The one compaction config model: server flags, JSON config files and per-request overrides all go through it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm_compact.am.methods import METHODS
from vllm_compact.head_table import UNIFORM, read_head_table

ENV_VAR = "VLLM_COMPACT_CONFIG"
MAX_RATIO = 1000.0

MethodName = Literal[METHODS]  # the method registry is the one list of methods
# The engine's reference queries are the protected recent window's, captured as they pass through attention: the
# queries that come after the compacted span. That is the only source the engine implements.
QuerySource = Literal["after"]
# Measured offline by `vllm-compact bench am` / `bench needle-sources`, not implemented in the engine: refused by
# name (a value accepted and then ignored would look like it worked).
OFFLINE_QUERY_SOURCES = ("context", "context-causal", "repeat")


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
    query_source: QuerySource = Field("after", description="Reference queries used to fit the compact segment.")
    max_reference_queries: int = Field(
        4096, ge=1, description="Per KV head cap of reference queries kept per request (bounded reservoir)."
    )
    value_ridge: float = Field(1e-3, ge=0.0, description="Relative ridge of the value least-squares fit.")
    refit_values: bool = Field(
        False,
        description="Refit the compact values by least squares on the reference queries (AM's C2). Off: the kept "
        "keys keep their values and only beta is fitted; values fitted on the recent window's queries lose facts "
        "that later queries read (bench needle-serving).",
    )
    distinct_share: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Share of each head's budget kept for the keys least like the span's others (RoPE undone), "
        "chosen without any query: facts a later question asks for survive a compaction made before it "
        "(bench needle-replica). The rest goes to the keys the reference queries attend to; with the question "
        "among them a larger share costs answers (bench needle-serving, 20x, 2K+4K: 27/40 at 0.5, 32/40 at 0.25).",
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
    memory_pressure: bool = Field(True, description="Compact instead of preempting when the KV pool runs out of pages.")
    recompact: bool = Field(True, description="Re-compact an already compacted segment (with its beta) as a request grows.")
    compact_during_prefill: bool = Field(
        False,
        description="Compact a request whose prompt is still being prefilled; otherwise only under memory pressure, "
        "so that the prompt's last tokens (usually the question) are among the reference queries.",
    )

    @field_validator("query_source", mode="before")
    @classmethod
    def _implemented_query_source(cls, value):
        if value in OFFLINE_QUERY_SOURCES:
            raise ValueError(
                f"query_source {value!r} is not implemented by the engine (measured offline only: `vllm-compact "
                "bench am`, `bench needle-replica`); the engine fits on the recent window's queries, 'after', and "
                "keeps query-free distinct keys (distinct_share)"
            )
        return value

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
