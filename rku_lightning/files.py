"""File helpers shared by loading, data provenance, exports and benchmarks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks (GGUF files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def share_like_open(path: Path) -> None:
    """Give a file or folder the permissions `open`/`mkdir` would have: tempfile makes them private (0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file beside `path` and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        handle.write(text)
    share_like_open(Path(handle.name))
    os.replace(handle.name, path)
