"""The fixed train / held-out split of the default model's training text.

The text is the reStructuredText source of the Python 3.11 documentation as
Debian ships it (package ``python3.11-doc``, PSF licence). A file is held out
when the sha256 of its path relative to the root is 0 modulo 10, so the split
depends only on file names and never on file order or machine.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DOCS_ROOT = Path("/usr/share/doc/python3.11-doc/html/_sources")
HELD_OUT_MODULUS = 10


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    path: Path
    held_out: bool

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def is_held_out(relpath: str) -> bool:
    digest = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
    return int(digest, 16) % HELD_OUT_MODULUS == 0


def list_source_files(root: Path = DOCS_ROOT) -> list[SourceFile]:
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist: install the training text with "
            "`apt-get install python3.11-doc` (Debian/Ubuntu) or pass --docs-root."
        )
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".txt"):
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                files.append(SourceFile(rel, path, is_held_out(rel)))
    return sorted(files, key=lambda f: f.relpath)
