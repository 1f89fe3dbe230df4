"""vLLM general-plugin entry point: imported in every vLLM process.

It changes nothing unless compaction is enabled (VLLM_COMPACT_CONFIG set by `vllm-compact serve
--kv-compaction` or by the Python API), so an installed plugin leaves stock vLLM stock.
"""

from __future__ import annotations


def register() -> None:
    from vllm_compact.config import config_from_env

    config = config_from_env()
    if config is None or not config.enabled:
        return
    from vllm_compact.integration.install import install

    install(config)
