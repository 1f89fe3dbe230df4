"""vllm-compact: KV-cache compaction with Attention Matching for vLLM."""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# Source checkout used without installing (PYTHONPATH=., e.g. on a GPU box with no vLLM): the top-level
# `kernels/` and `server/` folders are mapped into this namespace, as the installed package-dir mapping does.
_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_repo_root, "kernels", "__init__.py")
):
    for _sub in ("kernels", "server"):
        _path = _os.path.join(_repo_root, _sub)
        if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), _sub)):
            # A namespace-less alias: `vllm_compact.kernels` resolves to <repo>/kernels.
            __path__.append(_repo_root)  # type: ignore[name-defined]
            break
