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
from pathlib import Path

log = logging.getLogger(__name__)

HEX_RE = re.compile(r"^[0-9a-f]{64}$")


def layer_dir(root: Path | str, layer_digest: str) -> Path:
    return Path(root) / "pieces" / "sha256" / layer_digest.partition(":")[2]


class Pieces:
    """The verified pieces of one layer; safe to use from worker threads and other processes."""

    def __init__(self, root: Path | str, layer_digest: str) -> None:
        self.dir = layer_dir(root, layer_digest)
        self.loaded = 0  # pieces served from here
        self.stored = 0
        self._warned = False

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
        self.loaded += 1
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
            self.stored += 1
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if not self._warned:
                self._warned = True
                log.warning("cannot keep verified pieces in %s: %s", self.dir, exc)


def sizes(root: Path | str) -> dict[str, tuple[int, int]]:
    """``{layer digest: (pieces, bytes)}`` of what is kept, for ``ls`` and ``gc``."""
    base = Path(root) / "pieces" / "sha256"
    out: dict[str, tuple[int, int]] = {}
    try:
        layers = list(base.iterdir())
    except OSError:
        return out
    for d in layers:
        n = total = 0
        try:
            for p in d.iterdir():
                try:
                    total += p.lstat().st_size
                    n += 1
                except OSError:
                    pass
        except OSError:
            continue
        out[f"sha256:{d.name}"] = (n, total)
    return out
