"""Per-request compaction keys refused at admission, in the front-end process, before a request reaches the engine.

vLLM 0.32 declares one hook that runs for every request before it is sent to the engine core: the
`validate_params(sampling_params)` classmethod of each custom logits processor class named in the `logits_processors`
engine argument (`--logits-processors`). `InputProcessor._validate_params` calls it per request for the offline
`LLM`, `LLMEngine`, `AsyncLLM` and every API route alike (v1/engine/input_processor.py,
v1/sample/logits_processor/__init__.py: validate_logits_processors_parameters). So the class below is a logits
processor only in name: `apply` returns the logits untouched and it declares itself argmax-invariant; its point
is `validate_params`, which runs `request_config`, the same code the API middleware and the scheduler run.

What a caller sees: vLLM converts a plain ValueError raised there into a `VLLMValidationError` without the
parameter, so the hook raises `VLLMValidationError` itself, with `parameter="vllm_xargs.<key>"`: `LLM.generate`
raises it (vLLM 0.32's request-validation error: a `VLLMClientError`, not a ValueError subclass) and the API
server turns it into an HTTP 400 whose `param` names the key. The middleware still checks HTTP bodies first,
on the raw JSON, because vLLM's pydantic model turns a JSON `true` into 1 before this hook sees it.
"""

from __future__ import annotations

import functools
import os

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vllm_compact.config import ENV_VAR, CompactionConfig
from vllm_compact.core.request_overrides import RequestOverrideError, request_config

VALIDATOR_CLS = "vllm_compact.integration.request_validation:CompactionRequestValidator"  # vLLM wants <module>:<type>


class CompactionParamsError(VLLMValidationError):
    """A bad `kv_compaction_*` value, refused before the request reaches the engine; `parameter` names the key."""


@functools.lru_cache(maxsize=4)
def _parse(raw: str) -> CompactionConfig:
    return CompactionConfig.model_validate_json(raw)


def server_config() -> CompactionConfig | None:
    """The engine's settings, exported to this process's environment by `settings.activate`."""
    raw = os.environ.get(ENV_VAR)
    return _parse(raw) if raw else None


def check_request(sampling_params) -> None:
    config = server_config()
    if config is None:
        return
    try:
        request_config(config, sampling_params.extra_args)
    except RequestOverrideError as e:
        raise CompactionParamsError(str(e), parameter=e.param) from None


class CompactionRequestValidator(LogitsProcessor):
    """vLLM's per-request admission hook for the `kv_compaction_*` keys; leaves the logits alone."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        check_request(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
