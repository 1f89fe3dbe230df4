"""One boundary to vLLM: only vllm_compact/integration/ and server/ import it; the core imports and runs without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ("vllm_compact/integration/", "server/")


def _imports_vllm(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(n == "vllm" or n.startswith("vllm.") for n in names):
            lines.append(node.lineno)
    return lines


def test_vllm_is_imported_only_by_the_integration_and_the_server():
    sources = [p for folder in ("vllm_compact", "kernels", "server") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 50
    offenders = {}
    for path in sources:
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(ALLOWED) and (lines := _imports_vllm(path)):
            offenders[rel] = lines
    assert offenders == {}


def test_the_scan_sees_an_import_of_vllm(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom vllm_compact import am\ndef f():\n    from vllm.v1 import request\n")
    assert _imports_vllm(sample) == [4]


def test_the_core_kernels_and_am_import_without_loading_vllm():
    modules = [f"vllm_compact.core.{p.stem}" for p in (ROOT / "vllm_compact" / "core").glob("*.py")]
    modules += ["vllm_compact.am", "vllm_compact.kernels", "vllm_compact.kernels.request_attention",
                "vllm_compact.config", "vllm_compact.head_table", "vllm_compact.plugin"]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
