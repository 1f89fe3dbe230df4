"""`bench serving` without a server: the commands it builds (stock and compaction get the same memory and flags), the
memory-bound KV pool arithmetic, how a `vllm bench serve` result becomes a row, the merge by (server, workload), the
markdown ratios, flag errors, stopping a process group. One live test (marked slow) runs both servers on the tiny
model for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vllm_compact.benchmarks import serving
from vllm_compact.benchmarks.serving import (
    WORKLOADS,
    compaction_figures,
    kv_bytes_per_token,
    memory_bound_pool_bytes,
    merge_rows,
    parse_args,
    plan_runs,
    render_markdown,
    row_from_result,
)

# The fields of SmolLM2-135M's config.json the arithmetic reads (bf16, 30 layers, 3 KV heads, head_dim 64).
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "hidden_size": 576, "dtype": "bfloat16"}
TINY = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
        "hidden_size": 256, "dtype": "float32"}
MODEL_DIR = "/models/smollm2-135m"


def _runs(argv: list[str], config: dict = SMOLLM2, tmp="/tmp/runs"):
    from pathlib import Path

    return plan_runs(parse_args(argv), MODEL_DIR, "smollm2-135m", config, Path(tmp))


def _program_free(argv: list[str]) -> list[str]:
    """A server argv from the model folder on (drops `python -c SHIM serve` / `vllm-compact serve`)."""
    return argv[argv.index("serve") + 1:]


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ---- commands ----------------------------------------------------------------------------------------------------

def test_stock_and_compaction_get_the_same_memory_and_flags_in_every_workload():
    runs = _runs(["--server-args", "--enforce-eager --dtype bfloat16"])
    assert [(r.workload.name, r.server) for r in runs] == [(w, s) for w in WORKLOADS for s in ("stock", "compaction")]
    for stock, comp in zip(runs[::2], runs[1::2]):
        assert stock.workload == comp.workload and stock.kv_bytes == comp.kv_bytes
        assert stock.server_argv[:3] == serving.vllm_argv() and stock.server_argv[3] == "serve"
        assert os.path.basename(comp.server_argv[0]) == "vllm-compact" or comp.server_argv[1:3] == ["-m",
                                                                                                     "vllm_compact.server.cli"]
        # Same flags; compaction only adds --kv-compaction with its default settings.
        assert _program_free(comp.server_argv) == _program_free(stock.server_argv) + ["--kv-compaction"]
        s = _program_free(stock.server_argv)
        assert s[0] == MODEL_DIR and _value(s, "--served-model-name") == "smollm2-135m"
        assert int(_value(s, "--kv-cache-memory-bytes")) == stock.kv_bytes
        assert _value(s, "--max-model-len") == "8192" and _value(s, "--port") == "8200"
        assert "--enforce-eager" in s and _value(s, "--dtype") == "bfloat16"
        # The same load, only the result file differs.
        assert [a for a in stock.bench_argv if not a.endswith(".json")] == \
               [a for a in comp.bench_argv if not a.endswith(".json")]
        assert stock.env == comp.env


def test_server_environment_is_offline_and_sets_no_other_kv_size(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")  # would override --kv-cache-memory-bytes in vLLM's CPU platform
    monkeypatch.setenv("VLLM_COMPACT_CONFIG", '{"enabled": true}')  # would turn the stock server into a compacting one
    env = _runs(["--workloads", "short"])[0].env
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and "VLLM_COMPACT_CONFIG" not in env


def test_bench_commands_per_workload():
    by = {r.workload.name: r.bench_argv for r in _runs([]) if r.server == "stock"}
    common = {"--backend": "openai", "--base-url": "http://127.0.0.1:8200", "--model": "smollm2-135m",
              "--tokenizer": MODEL_DIR, "--percentile-metrics": "ttft,itl", "--metric-percentiles": "50,99",
              "--seed": "0", "--temperature": "0"}
    for argv in by.values():
        assert argv[3:5] == ["bench", "serve"]
        assert {k: _value(argv, k) for k in common} == common
        assert "--ignore-eos" in argv and "--save-result" in argv
    expected = {"unique": ("random", "16", "4", {"--random-input-len": "3000", "--random-output-len": "128"}),
                "memory-bound": ("random", "32", "32", {"--random-input-len": "4000", "--random-output-len": "128"}),
                "short": ("random", "32", "8", {"--random-input-len": "512", "--random-output-len": "128"}),
                "shared-prefix": ("prefix_repetition", "16", "4",
                                  {"--prefix-repetition-prefix-len": "2500", "--prefix-repetition-suffix-len": "60",
                                   "--prefix-repetition-num-prefixes": "2", "--prefix-repetition-output-len": "64"})}
    for name, (dataset, prompts, concurrency, lengths) in expected.items():
        argv = by[name]
        assert _value(argv, "--dataset-name") == dataset
        assert _value(argv, "--num-prompts") == prompts and _value(argv, "--max-concurrency") == concurrency
        assert {k: _value(argv, k) for k in lengths} == lengths
    assert "--random-input-len" not in by["shared-prefix"]
    assert _value(by["short"], "--result-filename") == "stock-short.json"


def test_size_flags_override_every_selected_workload_where_they_apply():
    runs = _runs(["--workloads", "short", "shared-prefix", "--num-prompts", "4", "--input-len", "64",
                  "--output-len", "8", "--concurrency", "2", "--prefix-len", "100", "--bench-args", "--num-warmups 1"])
    short, prefix = runs[0].bench_argv, runs[2].bench_argv
    assert _value(short, "--num-prompts") == _value(prefix, "--num-prompts") == "4"
    assert _value(short, "--random-input-len") == "64" and _value(short, "--random-output-len") == "8"
    assert _value(prefix, "--prefix-repetition-prefix-len") == "100"
    assert _value(prefix, "--prefix-repetition-suffix-len") == "60"  # not overridden: the default stays
    assert _value(prefix, "--prefix-repetition-output-len") == "8"
    assert _value(short, "--max-concurrency") == "2" and short[-2:] == ["--num-warmups", "1"]


def test_commands_display_as_a_user_types_them():
    run = _runs(["--workloads", "short"])[0]
    shown = serving.display(run.server_argv, run.env)
    assert shown.startswith(f"HF_HUB_OFFLINE=1 vllm serve {MODEL_DIR} ")
    assert serving.display(run.bench_argv).startswith("vllm bench serve --backend openai ")
    assert serving.display(_runs(["--workloads", "short"])[1].server_argv).startswith("vllm-compact serve ")


# ---- KV pool arithmetic ------------------------------------------------------------------------------------------

def test_kv_bytes_per_token_from_the_model_config():
    assert kv_bytes_per_token(SMOLLM2) == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(TINY) == 2 * 4 * 2 * 32 * 4  # float32 config
    assert kv_bytes_per_token(TINY, "bfloat16") == 2 * 4 * 2 * 32 * 2  # --dtype in --server-args wins
    no_head_dim = {k: v for k, v in SMOLLM2.items() if k != "head_dim"}
    assert kv_bytes_per_token(no_head_dim) == 23040  # hidden_size / heads
    with pytest.raises(ValueError):
        kv_bytes_per_token(SMOLLM2, "int3")


def test_memory_bound_pool_holds_a_quarter_of_the_requests():
    run = next(r for r in _runs(["--workloads", "memory-bound", "unique"]) if r.workload.name == "memory-bound")
    per_request = 4000 + 128
    assert run.kv_bytes == 8 * per_request * 23040 == 760_872_960
    assert run.kv_bytes // 23040 // per_request == 8 == run.workload.num_prompts // 4
    assert run.kv_bytes % (128 * 23040) == 0  # whole pages of the CPU's 128-token blocks
    unique = next(r for r in _runs(["--workloads", "unique", "--kv-cache-gib", "2"]))
    assert unique.kv_bytes == 2 << 30


def test_memory_bound_pool_rounds_up_to_whole_pages():
    assert memory_bound_pool_bytes(10, 1, 100, block_size=32) == 128 * 10
    runs = _runs(["--workloads", "memory-bound", "--pool-requests", "2", "--input-len", "100", "--output-len", "10",
                  "--server-args", "--block-size 32"], config=TINY)
    assert runs[0].kv_bytes == 224 * 2048  # 2 x 110 tokens -> 7 pages of 32


def test_the_real_model_config_gives_the_same_figures():
    from vllm_compact.models import registry

    if not registry.is_fetched("smollm2-135m"):
        pytest.skip("smollm2-135m not fetched")
    config = json.loads((registry.model_path("smollm2-135m") / "config.json").read_text())
    assert kv_bytes_per_token(config) == 23040


# ---- results -----------------------------------------------------------------------------------------------------

# What `vllm bench serve --save-result --percentile-metrics ttft,itl --metric-percentiles 50,99` writes (key names
# as in vllm/benchmarks/serve.py of 0.32; values made up).
SAMPLE_RESULT = {
    "date": "20250101-000000", "endpoint_type": "openai", "backend": "openai", "label": None,
    "model_id": "smollm2-135m", "tokenizer_id": "/models/smollm2-135m", "num_prompts": 16, "request_rate": "inf",
    "burstiness": 1.0, "max_concurrency": 4, "duration": 61.5, "completed": 16, "failed": 0,
    "total_input_tokens": 48000, "total_output_tokens": 2048, "request_throughput": 0.26, "request_goodput": None,
    "output_throughput": 33.3, "total_token_throughput": 813.8, "max_output_tokens_per_s": 60.0,
    "max_concurrent_requests": 4, "rtfx": 0.0,
    "mean_ttft_ms": 3100.0, "median_ttft_ms": 2900.0, "std_ttft_ms": 400.0, "p50_ttft_ms": 2900.0,
    "p99_ttft_ms": 4400.0, "mean_itl_ms": 95.0, "median_itl_ms": 90.0, "std_itl_ms": 20.0, "p50_itl_ms": 90.0,
    "p99_itl_ms": 180.0, "latencies": [1.0] * 16, "queue_times": [0.0] * 16,
}


def test_result_json_becomes_a_row():
    row = row_from_result(SAMPLE_RESULT, "stock", "unique")
    assert row["server"] == "stock" and row["workload"] == "unique"
    assert (row["requests"], row["completed"], row["failed"]) == (16, 16, 0)
    assert row["total_tok_s"] == 813.8 and row["output_tok_s"] == 33.3
    assert (row["ttft_p50_ms"], row["ttft_p99_ms"], row["itl_p50_ms"], row["itl_p99_ms"]) == (2900, 4400, 90, 180)
    assert row["duration_s"] == 61.5


def test_row_uses_the_median_without_p50_and_no_latencies_when_nothing_completed():
    result = {k: v for k, v in SAMPLE_RESULT.items() if not k.startswith("p50_")}
    assert row_from_result(result, "stock", "short")["itl_p50_ms"] == 90.0
    failed = {**SAMPLE_RESULT, "completed": 0, "failed": 16, "p99_ttft_ms": 0.0, "total_token_throughput": 0.0}
    row = row_from_result(failed, "compaction", "short")
    assert row["completed"] == 0 and row["ttft_p99_ms"] is None and row["itl_p50_ms"] is None


def test_compaction_figures_from_the_stats_endpoint():
    stats = {"scheduler": {"plans": 7}, "totals": {"running_requests": 0},
             "worker": {"compactions": 6, "dense_copy_bytes": 1000, "reservoir_bytes": 24}}
    assert compaction_figures(stats) == {"compactions": 6, "plans": 7, "outside_pool_bytes_peak": 1024}
    assert compaction_figures(stats, peak_outside_seen=5000)["outside_pool_bytes_peak"] == 5000  # sampled peak
    stats["worker"]["outside_pool_bytes_peak"] = 9000  # the worker's own peak wins when it reports one
    assert compaction_figures(stats, peak_outside_seen=5000)["outside_pool_bytes_peak"] == 9000
    assert compaction_figures(None) == {"compactions": None, "plans": None, "outside_pool_bytes_peak": None}
    # Workers that report the parts and the current total but no peak.
    assert serving.outside_pool_bytes_now({"worker": {"reservoir_bytes": 1, "segment_bytes": 2}}) == 3
    assert serving.outside_pool_bytes_now({"worker": {"outside_pool_bytes": 5, "reservoir_bytes": 1}}) == 5
    assert serving.outside_pool_bytes_now({"worker": {"compactions": 0}}) is None


def test_compaction_figures_from_the_projects_own_stats_payload():
    from tests.serving.stats_payloads import snapshot

    figures = compaction_figures(snapshot(compactions=3))
    assert figures["compactions"] == 3 and figures["plans"] == 3 and figures["outside_pool_bytes_peak"] >= 0


def _row(server: str, workload: str, **fields) -> dict:
    return {"server": server, "workload": workload, "requests": 16, "completed": 16, "total_tok_s": 100.0,
            "output_tok_s": 10.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "itl_p50_ms": 3.0, "itl_p99_ms": 4.0,
            "peak_rss_mb": 1000.0, "kv_pool_bytes": 1 << 30, "outside_pool_bytes_peak": None, "compactions": 0,
            "command": f"vllm bench serve {workload}", "server_command": f"vllm serve {server}", **fields}


def test_merge_replaces_by_server_and_workload_and_keeps_the_rest():
    old = [_row("stock", "short", total_tok_s=1.0), _row("compaction", "short", total_tok_s=2.0),
           _row("stock", "unique", total_tok_s=3.0)]
    new = [_row("compaction", "short", total_tok_s=20.0), _row("compaction", "unique", total_tok_s=30.0)]
    merged = merge_rows(old, new)
    assert [(r["workload"], r["server"], r["total_tok_s"]) for r in merged] == [
        ("unique", "stock", 3.0), ("unique", "compaction", 30.0), ("short", "stock", 1.0),
        ("short", "compaction", 20.0)]


def test_write_doc_merges_with_the_existing_file(tmp_path):
    out = tmp_path / "serving.json"
    serving.write_doc(out, "first", {"summary": "m"}, [_row("stock", "short"), _row("compaction", "short")])
    doc = serving.write_doc(out, "second", {"summary": "m"}, [_row("compaction", "short", total_tok_s=7.0)])
    assert doc["command"] == "second" and json.loads(out.read_text()) == doc
    assert [(r["server"], r["total_tok_s"]) for r in doc["rows"]] == [("stock", 100.0), ("compaction", 7.0)]
    assert "| short | 0.07x |" in out.with_suffix(".md").read_text()


def test_markdown_ratios_compaction_over_stock():
    rows = [_row("stock", "memory-bound"),
            _row("compaction", "memory-bound", total_tok_s=150.0, itl_p99_ms=6.0, ttft_p99_ms=1.0, peak_rss_mb=900.0,
                 compactions=12, outside_pool_bytes_peak=3 << 20),
            _row("stock", "short")]
    md = render_markdown({"command": "vllm-compact bench serving", "machine": {"summary": "2 CPUs"}, "rows": rows})
    assert "| memory-bound | 1.50x | 1.50x | 0.50x | 0.90x |" in md
    assert "| short | - (one server missing) | - | - | - |" in md
    assert "| memory-bound | compaction | 16 | 16 | 150.0 |" in md and "| 3.00 | 12 |" in md
    assert "load `vllm bench serve memory-bound`" in md and "server `vllm serve compaction`" in md
    assert "`vllm-compact bench serving`" in md


# ---- flags -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--workloads", "huge"], ["--servers", "sglang"], ["--num-prompts", "0"], ["--kv-cache-gib", "-1"],
    ["--port", "70000"], ["--workloads", "short", "short"], ["--server-args", "--port 1"],
    ["--server-args", "--kv-cache-memory-bytes=5"], ["--bench-args", "--num-prompts 3"], ["--server-args", "'"],
    ["--no-such-flag"],
])
def test_bad_flags_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        serving.main(argv)
    assert e.value.code == 2
    assert "vllm-compact bench serving: error:" in capsys.readouterr().err


def test_every_flag_is_explained_in_help():
    for action in serving._parser()._actions:
        assert action.help, action.option_strings


def test_registered_as_a_bench_command():
    from vllm_compact.server.bench import BENCHMARKS

    assert BENCHMARKS["serving"][0] == "vllm_compact.benchmarks.serving"


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    from vllm_compact.models import registry

    if not registry.is_fetched("tiny"):
        pytest.skip("tiny not fetched")
    out = tmp_path / "serving.json"
    assert serving.main(["--model", "tiny", "--workloads", "memory-bound", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2048 KV bytes per token" in printed
    assert printed.count("vllm serve ") == 1 and printed.count("vllm-compact serve ") == 1
    assert f"--kv-cache-memory-bytes {8 * 4128 * 2048}" in printed
    assert not out.exists()


def test_a_pool_smaller_than_max_model_len_is_refused_before_starting_anything(tmp_path, capsys):
    from vllm_compact.models import registry

    if not registry.is_fetched("tiny"):
        pytest.skip("tiny not fetched")
    argv = ["--model", "tiny", "--workloads", "memory-bound", "--pool-requests", "1", "--input-len", "1000",
            "--out", str(tmp_path / "serving.json")]
    assert serving.main([*argv, "--max-model-len", "8192"]) == 2  # no --dry-run: it would have started servers
    assert "less than --max-model-len 8192" in capsys.readouterr().err
    assert serving.main([*argv, "--max-model-len", "1024", "--dry-run"]) == 0


# ---- processes ---------------------------------------------------------------------------------------------------

def test_stop_server_ends_the_whole_group_and_kills_what_ignores_sigterm():
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    time.sleep(1.0)
    assert serving.tree_rss_bytes(process.pid) > 0
    t0 = time.monotonic()
    serving.stop_server(process, timeout=1.0)
    assert time.monotonic() - t0 < 20
    assert process.returncode == -signal.SIGKILL
    assert not serving._group_alive(process.pid)


def _fake_run(tmp_path, server_code: str):
    from pathlib import Path

    run = _runs(["--workloads", "short"], tmp=str(tmp_path))[0]
    run.server_argv = [sys.executable, "-c", server_code]
    run.log_path = Path(tmp_path) / "stock-short.server.log"
    return run


def test_a_server_that_exits_at_start_fails_the_run_with_its_log_tail(tmp_path):
    from tests.serving.live_server import free_port

    run = _fake_run(tmp_path, "print('CUDA out of imagination'); raise SystemExit(3)")
    args = parse_args(["--workloads", "short", "--port", str(free_port()), "--start-timeout", "60"])
    with pytest.raises(serving.RunError, match=r"exited with code 3(.|\n)*CUDA out of imagination"):
        serving.execute(run, args, per_token=23040)


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    from tests.serving.live_server import free_port

    run = _fake_run(tmp_path, "import time; print('compiling', flush=True); time.sleep(120)")
    args = parse_args(["--workloads", "short", "--port", str(free_port()), "--start-timeout", "2",
                       "--stop-timeout", "5"])
    t0 = time.monotonic()
    with pytest.raises(serving.RunError, match=r"did not answer /health within 2 s(.|\n)*compiling"):
        serving.execute(run, args, per_token=23040)
    assert time.monotonic() - t0 < 30


def test_tree_rss_without_psutil_matches():
    mine = serving.tree_rss_bytes(os.getpid())
    assert mine > 0 and abs(serving._proc_tree_rss(os.getpid()) - mine) < mine * 0.2


def test_port_free_sees_a_listening_socket():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not serving.port_free("127.0.0.1", port)
        with pytest.raises(serving.RunError):
            serving.wait_port_free("127.0.0.1", port, timeout=0.5)
    assert serving.port_free("127.0.0.1", port)


# ---- live: both servers, for real, on the tiny model (about 2 minutes) --------------------------------------------

@pytest.mark.slow
def test_live_bench_serving_tiny_short(tmp_path):
    from tests.serving.live_server import free_port

    out = tmp_path / "serving.json"
    argv = ["--model", "tiny", "--workloads", "short", "--num-prompts", "4", "--input-len", "64", "--output-len", "8",
            "--concurrency", "4", "--kv-cache-gib", "0.25", "--max-model-len", "2048", "--server-args",
            "--enforce-eager", "--port", str(free_port()), "--out", str(out), "--start-timeout", "300"]
    assert serving.main(argv) == 0
    doc = json.loads(out.read_text())
    rows = {r["server"]: r for r in doc["rows"]}
    assert set(rows) == {"stock", "compaction"}
    for server, row in rows.items():
        assert row["workload"] == "short" and row["requests"] == 4
        assert row["completed"] == row["requests"], (server, row)
        assert row["total_tok_s"] > 0 and row["peak_rss_mb"] > 0 and row["kv_pool_bytes"] == 1 << 28
        assert row["command"].startswith("vllm bench serve ")
    assert rows["stock"]["compactions"] == 0 and rows["stock"]["outside_pool_bytes_peak"] is None
    assert rows["compaction"]["compactions"] == 0  # 64-token prompts never reach the trigger
    assert doc["command"].startswith("vllm-compact bench serving --model tiny")
    assert "| short |" in out.with_suffix(".md").read_text()
