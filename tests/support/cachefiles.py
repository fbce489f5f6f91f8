"""Helpers that age a test's cache directory, since gc never sweeps what was used in the last minute."""

from __future__ import annotations

import os
import time
from pathlib import Path


def backdate(cache_dir: Path, seconds: float = 3600.0) -> None:
    """Set every file's times ``seconds`` into the past. A live mount keeps writing the cache (ingests
    committed, index files renamed into place, mount records), so a path that vanished between the walk
    and the ``utime`` is skipped rather than failing the test."""
    then = time.time() - seconds
    for p in Path(cache_dir).rglob("*"):
        try:
            os.utime(p, (then, then), follow_symlinks=False)
        except FileNotFoundError:
            pass


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt a committed (read-only) cache file in place, as a failing disk would: one byte inverted."""
    path = Path(path)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
