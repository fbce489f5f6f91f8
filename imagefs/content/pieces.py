"""Verified pieces of layers whose blob is not here, kept so a later mount reads them offline.

::

    CACHE/pieces/sha256/<layer hex>/<piece sha256 hex>

A lazily read layer (a gzip layer read through its span index after its blob was evicted, an
eStargz or zstd:chunked layer read chunk by chunk) fetches only the pieces a read touches and
checks each against a digest its index recorded. Those checked pieces are written here, named by
that digest — a gzip span by the sha256 of its compressed bytes, a TOC chunk by its
``chunkDigest`` (of its uncompressed bytes) — so reading the same file on the next mount costs no
registry request. A piece is re-hashed on every load: a wrong one is removed and fetched again,
never served. Grouped by layer, so ``gc`` drops them with their layer's last reference (or once
the whole blob is committed, which makes them redundant).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from . import layout

log = logging.getLogger(__name__)

HEX_RE = re.compile(r"^[0-9a-f]{64}$")


def layer_dir(root: Path | str, layer_digest: str) -> Path:
    return layout.pieces_of(root, layer_digest)


class Pieces:
    """The verified pieces of one layer; safe to use from worker threads and other processes."""

    def __init__(self, root: Path | str, layer_digest: str) -> None:
        self.dir = layer_dir(root, layer_digest)
        self._warned = False  # a full disk is said once per layer

    def get(self, sha256_hex: str) -> bytes | None:
        """The piece whose sha256 is ``sha256_hex``, checked now; None if it is not here (or was wrong)."""
        if not HEX_RE.match(sha256_hex):
            return None
        path = self.dir / sha256_hex
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256_hex:
            log.warning("%s: a cached piece does not match its digest: removed, fetching it again", path)
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, sha256_hex: str, data: bytes) -> None:
        """Keep ``data``, which the caller has checked against ``sha256_hex``. Best effort: a full
        disk costs a later refetch, never a wrong byte."""
        if not HEX_RE.match(sha256_hex):
            return
        path = self.dir / sha256_hex
        tmp = self.dir / f".{sha256_hex}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers see the whole piece or none
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if not self._warned:
                self._warned = True
                log.warning("cannot keep verified pieces in %s: %s", self.dir, exc)


@dataclass(frozen=True)
class Kept:
    """One layer's kept pieces, as ``ls``, ``gc`` and ``fsck`` see them."""

    layer: str  # the layer's digest
    dir: Path
    files: tuple[Path, ...]  # the pieces, not a writer's temporary files
    size: int  # bytes on disk, temporary files included
    mtime: float  # when a piece was last added

    @property
    def name(self) -> str:
        return f"layer-{self.layer}"


def kept(root: Path | str) -> list[Kept]:
    """Every layer's kept pieces, one directory listing each."""
    base = layout.pieces(root)
    try:
        dirs = list(base.iterdir())
    except OSError:
        return []
    out = []
    for d in dirs:
        files, size = [], 0
        try:
            mtime = d.lstat().st_mtime
            for p in d.iterdir():
                try:
                    size += p.lstat().st_size
                except OSError:
                    continue
                if not p.name.startswith("."):
                    files.append(p)
        except OSError:
            continue
        out.append(Kept(f"sha256:{d.name}", d, tuple(files), size, mtime))
    return out
