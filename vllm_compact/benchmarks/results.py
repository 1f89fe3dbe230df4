"""The one results writer of `vllm-compact bench` and `vllm-compact calibrate --evaluate`.

A run writes a JSON document and a markdown page beside it (same name, `.md`), both recording the command that
produced them. Results are meant to be committed and read elsewhere, so paths of the machine they were made on
never reach them: the working directory becomes relative, the home directory `~`, the temporary directory
`$TMPDIR` (`MachinePaths.scrub`, applied to everything written, and to the raw logs a benchmark keeps).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


def command_line(*words: str) -> str:
    """A shell-quoted command (`command_line("vllm-compact", "bench", "am", *argv)`)."""
    return shlex.join(words)


@dataclass(frozen=True)
class MachinePaths:
    """Prefixes that name this machine, each with what replaces it, longest (most specific) first."""

    replacements: tuple[tuple[str, str], ...]

    @classmethod
    def here(cls) -> MachinePaths:
        pairs = {str(Path.cwd()): ".", str(Path(tempfile.gettempdir())): "$TMPDIR", "/tmp": "$TMPDIR",
                 str(Path.home()): "~"}
        if sys.prefix != sys.base_prefix:  # a virtual environment (inside the working directory or not)
            pairs[str(Path(sys.prefix))] = "$VENV"
        ordered = sorted(((p, r) for p, r in pairs.items() if p not in ("", "/")), key=lambda pr: -len(pr[0]))
        return cls(tuple(ordered))

    def scrub(self, text: str) -> str:
        for prefix, replacement in self.replacements:
            if replacement == ".":
                text = text.replace(prefix + "/", "")  # below the working directory: a relative path
            # whole path components only: /srv/repo is not the start of /srv/repository
            text = re.sub(re.escape(prefix) + r"(?![\w.-])", replacement, text)
        return text


class ResultsFile:
    """`PATH.json` and `PATH.md`, written whole each time (a long run may write after every row)."""

    def __init__(self, path: str | os.PathLike, paths: MachinePaths | None = None) -> None:
        self.path = Path(path)
        self.paths = paths or MachinePaths.here()

    @property
    def markdown_path(self) -> Path:
        return self.path.with_suffix(".md")

    def read(self) -> dict | None:
        """The document written before (runs that merge their rows into it), None if there is none."""
        return json.loads(self.path.read_text()) if self.path.exists() else None

    def write(self, document: dict, markdown: str) -> None:
        if "command" not in document:
            raise ValueError("a results document records the command that produced it ('command')")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.paths.scrub(json.dumps(document, indent=1, default=str)) + "\n")
        self.markdown_path.write_text(self.paths.scrub(markdown.rstrip("\n")) + "\n")

    def scrub_file(self, path: str | os.PathLike) -> None:
        """Take this machine's paths out of a raw file kept beside the results (a server log)."""
        path = Path(path)
        if path.is_file():
            path.write_text(self.paths.scrub(path.read_text(errors="replace")))
