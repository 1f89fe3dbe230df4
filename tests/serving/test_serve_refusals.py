"""`vllm-compact serve --kv-compaction` exits 2 before the model loads on what compaction does not support, with a
message naming the flag or config.json field: parallelism, a KV cache dtype other than the model's, and models with
sliding window attention, attention logit soft-capping, learned attention sinks or hybrid layers (these from the
model's config.json, before vLLM is even imported)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# config.json edits of the tiny model -> the fragment the message must hold
MODELS = {
    "sliding": ({"sliding_window": 4096}, "config.json sets sliding_window=4096 (sliding window attention)"),
    "softcap": ({"attn_logit_softcapping": 50.0}, "config.json sets attn_logit_softcapping=50.0"),
    "sinks": ({"attention_sinks": True}, "config.json sets attention_sinks=true (learned attention sinks)"),
    "hybrid": ({"layer_types": ["full_attention", "linear_attention"] * 2}, "layer_types ['linear_attention']"),
}
# serve flags on the tiny model -> the fragment
FLAGS = {
    "tensor parallel": (["--tensor-parallel-size", "2"], "--tensor-parallel-size=2 (tensor_parallel_size)"),
    "pipeline parallel": (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size=2"),
    "data parallel": (["--data-parallel-size", "2"], "--data-parallel-size=2"),
    "fp8 KV cache": (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype=fp8 (kv_cache_dtype)"),
}

# All cases in one interpreter, the model cases first: the exit code, stderr, and whether vLLM was imported yet.
_RUNNER = """
import contextlib, io, json, sys
from vllm_compact.server.serve import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, err.getvalue(), any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    from vllm_compact.models.registry import ensure_model

    tiny = ensure_model("tiny")
    base = json.loads((tiny / "config.json").read_text())
    argvs, names = [], []
    for name, (edit, _) in MODELS.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "config.json").write_text(json.dumps({**base, **edit}))  # the model never loads: no weights
        argvs.append([str(folder), "--kv-compaction", "--max-model-len", "2048", "--dtype", "float32"])
        names.append(name)
    for name, (flags, _) in FLAGS.items():
        argvs.append([str(tiny), "--kv-compaction", *flags, "--max-model-len", "2048", "--dtype", "float32"])
        names.append(name)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(zip(names, json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("name", [*MODELS, *FLAGS])
def test_unsupported_setup_exits_2_naming_the_setting(outcomes, name):
    rc, stderr, _ = outcomes[name]
    fragment = {**MODELS, **FLAGS}[name][1]
    assert rc == 2
    last = stderr.strip().splitlines()
    start = next(i for i, line in enumerate(last) if line.startswith("vllm-compact serve: KV compaction does not"))
    assert fragment in "\n".join(last[start:])
    assert "Traceback" not in stderr


def test_models_are_refused_from_their_config_json_before_vllm_is_imported(outcomes):
    assert not any(outcomes[name][2] for name in MODELS)
