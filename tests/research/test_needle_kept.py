"""research.needle_kept reads what the engine's compactions kept: with `recent` every head keeps exactly the newest
round(span / ratio) keys of the span, so each needle token's share of heads is 1 or 0 by its position alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from research.needle_kept import kept_share
from vllm_compact.models.registry import ensure_model

REPO = Path(__file__).resolve().parents[2]


def test_kept_shares_match_the_newest_keys_of_the_span(tmp_path):
    ensure_model("tiny")
    out = tmp_path / "kept.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "research.needle_kept", "--model", "tiny", "--context", "1600",
         "--depths", "3", "--configs", "recent:2", "recent:4", "--max-tokens", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    checked = 0
    for prompt in result["prompts"]:
        if prompt["span"] is None:
            continue  # this prompt was not compacted
        start, end = prompt["span"]
        budget = max(1, round((end - start) / prompt["ratio"]))
        expected = [1.0 if end - budget <= p < end else 0.0 for p in prompt["positions"]]
        assert prompt["kept_share"] == expected
        checked += 1
    assert checked == 6  # every prompt of both ratios was compacted
    assert {row["needles_in_span"] for row in result["rows"]} == {1}  # the middle needle; depth 0 and 1 are protected
    assert out.with_suffix(".md").exists()


def test_kept_share_counts_the_heads_holding_each_position():
    kept = [[[10, 14], [3, 7, 9]], [[10], []]]
    assert kept_share(kept, [10, 14, 9, 99]) == [0.5, 0.25, 0.25, 0.0]
