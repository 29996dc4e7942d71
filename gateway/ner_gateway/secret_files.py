"""Secrets mounted as files (a Kubernetes Secret, a cert-manager certificate): their tokens, and whether a
file changed since it was read."""

from __future__ import annotations

import os
from pathlib import Path

FileStamp = tuple[int, int, int]


def parse_tokens(text: str) -> list[str]:
    """One token per line; blank lines and ``#`` comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def file_stamp(path: Path) -> FileStamp:
    """What changes when the file does: mtime, size and inode (a Secret update swaps a symlink: a new inode).
    Raises OSError when the file cannot be read."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino
