"""A CPU KV-cache size that fits the machine when the user sets none.

vLLM's CPU worker reserves `--gpu-memory-utilization` (0.92) of the first NUMA node's TOTAL memory and refuses to
start when the node has less than that available, which is the normal state of a machine that has run anything
(setup, tests) since boot. With no memory setting given, `vllm-compact serve` asks instead for an explicit KV
cache sized from what the node really has available now, and says so in the log. Any user setting wins:
`--kv-cache-memory-bytes`, `--gpu-memory-utilization` or `VLLM_CPU_KVCACHE_SPACE`.
"""

from __future__ import annotations

import argparse
import os
import sys

GiB = 1 << 30
# Share of the node's available memory given to the KV cache; the rest is left for the weights, activations and
# whatever else runs on the machine. Capped: a bigger pool only costs start-up time on a small model.
KV_SHARE = 0.4
KV_MIN_BYTES = GiB // 2
KV_MAX_BYTES = 8 * GiB
USER_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--kv_cache_memory_bytes", "--gpu-memory-utilization",
                     "--gpu_memory_utilization")


def default_kv_cache_bytes(available_bytes: int) -> int:
    """KV cache bytes for a node with `available_bytes` free: KV_SHARE of it, within [KV_MIN_BYTES, KV_MAX_BYTES]."""
    return int(min(KV_MAX_BYTES, max(KV_MIN_BYTES, KV_SHARE * available_bytes)))


def user_set_memory(argv: list[str], environ: dict[str, str]) -> bool:
    if environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return True
    return any(token.split("=", 1)[0] in USER_MEMORY_FLAGS for token in argv)


def node_available_bytes() -> int:
    """Available memory of the NUMA node vLLM's CPU worker checks (that of the first CPU it may run on)."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    cpus = get_allowed_cpu_list()
    node = cpus[0].numa_node if cpus else 0
    return int(get_memory_node_info(max(node, 0)).available_memory)


def apply_cpu_kv_cache_default(args: argparse.Namespace, argv: list[str]) -> int | None:
    """On a CPU platform with no memory setting, set args.kv_cache_memory_bytes; returns the bytes set (or None)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or user_set_memory(argv, dict(os.environ)):
        return None
    available = node_available_bytes()
    size = default_kv_cache_bytes(available)
    args.kv_cache_memory_bytes = size
    print(
        f"vllm-compact serve: no KV cache size given; using {size / GiB:.2f} GiB ({KV_SHARE:.0%} of the "
        f"{available / GiB:.2f} GiB available on the CPU's memory node). Set --kv-cache-memory-bytes or "
        "VLLM_CPU_KVCACHE_SPACE to choose.",
        file=sys.stderr,
    )
    return size
