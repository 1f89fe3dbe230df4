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
    # No query_source setting (the engine has one source of reference queries, the recent window's).
    (["--kv-compaction", "--kv-compaction-config", '{"query_source": "after"}'],
     ["--kv-compaction-config field 'query_source': unknown compaction setting"]),
    # Settings that would be accepted and then ignored are refused by name.
    (["--kv-compaction", "--kv-compaction-max-reference-queries", "512"],
     ["--kv-compaction-max-reference-queries: max_reference_queries (512) must be at most recent_window_tokens (256)"]),
    (["--kv-compaction", "--kv-compaction-value-ridge", "0.1"],
     ["--kv-compaction-value-ridge: value_ridge (0.1) applies only with refit_values"]),
    (["--kv-compaction", "--kv-compaction-config", '{"value_ridge": 0.1, "refit_values": false}'],
     ["value_ridge (0.1) applies only with refit_values"]),
    # Head-budget files (@name: a file written by the fixture; the model is the tiny one: 4 layers x 2 KV heads).
    (["--kv-compaction", "--kv-compaction-head-budgets", "@not_json"],
     ["--kv-compaction-head-budgets=", "is not valid JSON", '{"proportions": [[p per KV head] per layer]}']),
    (["--kv-compaction", "--kv-compaction-head-budgets", "@no_key"], ['must be a JSON object with a "proportions" key']),
    (["--kv-compaction", "--kv-compaction-head-budgets", "@ragged"], ["rows have different lengths [1, 2]"]),
    (["--kv-compaction", "--kv-compaction-head-budgets", "@negative"], ["proportions[1][0]=-0.5", "finite number >= 0"]),
    (["--kv-compaction", "--kv-compaction-head-budgets", "@string"], ["proportions[0][1]='1'", "is not a number"]),
    (["--kv-compaction", "--kv-compaction-head-budgets", "@zeros"], ["sum to 0"]),
    (["--kv-compaction", "--kv-compaction-config", '{"head_budget_file": "@negative"}'],
     ["--kv-compaction-config field 'head_budget_file'=", "proportions[1][0]=-0.5"]),
    (["--kv-compaction", "--kv-compaction-head-budgets", "@wrong_shape"],
     ["--kv-compaction-head-budgets: head_budget_file", "has 3 layers x 2 KV heads; the model has 4 layers x 2 KV heads"]),
    (["--kv-compaction", "--kv-compaction-config", '{"head_budget_file": "@wrong_heads"}'],
     ["--kv-compaction-config field 'head_budget_file'", "4 layers x 3 KV heads; the model has 4 layers x 2"]),
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


HEAD_FILES = {
    "not_json": '{"proportions": [[1, 2],',
    "no_key": json.dumps({"props": [[1, 1]] * 4}),
    "ragged": json.dumps({"proportions": [[1], [1, 2], [1, 1], [1, 1]]}),
    "negative": json.dumps({"proportions": [[1, 1], [-0.5, 1], [1, 1], [1, 1]]}),
    "string": json.dumps({"proportions": [[1, "1"], [1, 1], [1, 1], [1, 1]]}),
    "zeros": json.dumps({"proportions": [[0, 0]] * 4}),
    "wrong_shape": json.dumps({"proportions": [[1, 1]] * 3}),
    "wrong_heads": json.dumps({"proportions": [[1, 1, 1]] * 4}),
    "good": json.dumps({"proportions": [[1, 2]] * 4}),
}


def _with_files(tokens: list[str], files: dict[str, str]) -> list[str]:
    out = []
    for token in tokens:
        for name, path in files.items():
            token = token.replace(f"@{name}", path)
        out.append(token)
    return out


@pytest.fixture(scope="module")
def head_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("head_budgets")
    files = {}
    for name, text in sorted(HEAD_FILES.items(), key=lambda item: -len(item[0])):  # @wrong_heads before @wrong...
        (folder / f"{name}.json").write_text(text)
        files[name] = str(folder / f"{name}.json")
    return files


@pytest.fixture(scope="module")
def outcomes(head_files) -> dict:
    from vllm_compact.models.registry import ensure_model

    tiny = str(ensure_model("tiny"))  # a real config.json (4 layers x 2 KV heads) for the shape checks
    argvs = [[tiny if any(t.startswith("@") or "@" in t for t in extra) else "/no/such/model",
              *_with_files(extra, head_files), "--max-model-len", "2048", "--dtype", "float32"] for extra, _ in BAD]
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


@pytest.mark.parametrize("model_args", [["tiny"], ["--model", "@tiny"], ["--model=tiny"], ["@tiny"]])
def test_head_budget_shape_is_checked_against_the_models_config_json(head_files, model_args):
    from vllm_compact.models.registry import ensure_model
    from vllm_compact.server.flags import CompactionFlagError, check_head_budgets, local_model_dir, model_from_argv

    tiny = str(ensure_model("tiny"))
    for name, fails in (("wrong_shape", True), ("wrong_heads", True), ("good", False)):
        argv = [*(tiny if a == "@tiny" else a for a in model_args), "--kv-compaction",
                "--kv-compaction-head-budgets", head_files[name]]
        config = check_compaction_argv(argv)
        assert local_model_dir(model_from_argv(argv)) is not None
        if fails:
            with pytest.raises(CompactionFlagError, match="the model has 4 layers x 2 KV heads"):
                check_head_budgets(config, local_model_dir(model_from_argv(argv)), argv)
        else:
            check_head_budgets(config, local_model_dir(model_from_argv(argv)), argv)


def test_an_unknown_model_leaves_the_shape_to_the_engine(head_files):
    from vllm_compact.core.budgets import HeadBudgetPolicy
    from vllm_compact.server.flags import check_head_budgets, local_model_dir

    argv = ["/no/such/model", "--kv-compaction", "--kv-compaction-head-budgets", head_files["wrong_shape"]]
    assert local_model_dir("/no/such/model") is None and local_model_dir("no-such-org/no-such-model") is None
    check_head_budgets(check_compaction_argv(argv), None, argv)  # nothing to check against yet
    # ... and the engine refuses it when it starts (its scheduler builds this policy from the model config).
    with pytest.raises(ValueError, match="has 3 layers x 2 KV heads; the model has 4 layers x 2 KV heads"):
        HeadBudgetPolicy(num_layers=4, num_kv_heads=2, ratio=8.0, table_path=head_files["wrong_shape"])
    policy = HeadBudgetPolicy(num_layers=4, num_kv_heads=2, ratio=8.0, table_path=head_files["good"])
    assert abs(float(policy.table.sum()) - 1.0) < 1e-12 and float(policy.table[0, 1]) == 2 * float(policy.table[0, 0])


def test_a_registry_name_is_served_under_that_name_beside_its_folder() -> None:
    from vllm_compact.server.serve import served_model_names

    assert served_model_names("smollm2-135m", "/cache/smollm2-135m", None) == ["smollm2-135m", "/cache/smollm2-135m"]
    assert served_model_names("/models/x", "/models/x", None) is None  # a path stays vLLM's default
    assert served_model_names("smollm2-135m", "/cache/smollm2-135m", ["mine"]) == ["mine"]  # the user's wins
