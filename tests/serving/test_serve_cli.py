"""`vllm-compact serve` refuses bad compaction settings with exit code 2 before vLLM is imported (so before any
model load), with a message naming the flag or config field, the value and what is allowed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_compact.server.flags import check_compaction_argv

# argv after MODEL -> fragments the message must contain
BAD: list[tuple[list[str], list[str]]] = [
    (["--kv-compaction", "--kv-compaction-ratio", "abc"], ["--kv-compaction-ratio='abc'", "a number >= 1.0 and <= 1000.0"]),
    (["--kv-compaction", "--kv-compaction-ratio", "0.5"], ["--kv-compaction-ratio='0.5'", "greater than or equal to 1"]),
    (["--kv-compaction", "--kv-compaction-method", "foo"],
     ["--kv-compaction-method='foo'", "not one of the choices", "'am-highest-attention', 'am-omp'"]),
    (["--kv-compaction", "--kv-compaction-trigger", "-3"], ["--kv-compaction-trigger='-3'", "an integer >= 1"]),
    (["--kv-compaction", "--kv-compaction-query-source", "x"], ["--kv-compaction-query-source='x'", "'context-causal'"]),
    (["--kv-compaction", "--kv-compaction-head-budgets", "/nonexistent/b.json"],
     ["--kv-compaction-head-budgets", "'/nonexistent/b.json' does not exist", "a path to an existing JSON file"]),
    (["--kv-compaction", "--kv-compaction-config", '{"ratio": "x"}'],
     ["--kv-compaction-config field 'ratio'='x'", "a number >= 1.0"]),
    (["--kv-compaction", "--kv-compaction-config", '{"bogus": 1}'],
     ["field 'bogus'", "unknown compaction setting", "trigger_tokens"]),
    (["--kv-compaction", "--kv-compaction-config", "notjson"],
     ["--kv-compaction-config='notjson'", "neither a JSON object nor a readable JSON file", "allowed: a JSON object"]),
    (["--kv-compaction", "--kv-compaction-config", "[1]"], ["--kv-compaction-config='[1]' must be a JSON object"]),
    (["--kv-compaction-ratio", "8"], ["without --kv-compaction"]),
    (["--kv-compaction", "--kv_compaction_ratio=abc"], ["--kv-compaction-ratio='abc'"]),  # vLLM's underscore spelling
    (["--kv-compaction", "--kv-compaction-value-ridge", "-1", "--kv-compaction-max-reference-queries", "0"],
     ["--kv-compaction-value-ridge='-1'", "a number >= 0.0", "--kv-compaction-max-reference-queries='0'"]),
    (["--kv-compaction", "--kv-compaction-config", '{"recompact": "maybe"}'],
     ["field 'recompact'='maybe'", "true or false"]),
]

# All cases in one interpreter: the exit code of `main`, its stderr, and whether vLLM was ever imported.
_RUNNER = """
import contextlib, io, json, sys
from vllm_compact.server.serve import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, err.getvalue()])
print(json.dumps({"results": results, "vllm_imported": any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def outcomes() -> dict:
    argvs = [["/no/such/model", *extra, "--max-model-len", "2048", "--dtype", "float32"] for extra, _ in BAD]
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(BAD)), ids=[" ".join(argv) for argv, _ in BAD])
def test_bad_setting_exits_2_with_a_message_naming_flag_value_and_allowed(outcomes, index):
    rc, stderr = outcomes["results"][index]
    assert rc == 2
    assert stderr.startswith("vllm-compact serve: ")
    for fragment in BAD[index][1]:
        assert fragment in stderr


def test_bad_settings_never_import_vllm(outcomes):
    assert outcomes["vllm_imported"] is False


def test_console_script_exits_2():
    exe = shutil.which("vllm-compact", path=str(Path(sys.executable).parent))
    proc = subprocess.run([exe, "serve", "/no/such/model", "--kv-compaction", "--kv-compaction-method", "magic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--kv-compaction-method='magic'" in proc.stderr


def test_good_settings_pass_and_combine_config_and_flags(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"ratio": 12, "trigger_tokens": 500, "method": "snapkv"}))
    cfg = check_compaction_argv(["m", "--max-model-len", "2048", "--kv-compaction", "--kv-compaction-config",
                                 str(cfg_file), "--kv-compaction-trigger", "64", "--no-kv-compaction-recompact"])
    assert (cfg.enabled, cfg.ratio, cfg.trigger_tokens, cfg.method, cfg.recompact) == (True, 12.0, 64, "snapkv", False)
    assert check_compaction_argv(["m", "--max-model-len", "2048"]).enabled is False
