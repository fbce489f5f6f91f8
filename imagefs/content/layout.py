"""The shape of the cache directory, in one place.

Every path under ``CACHE/`` is named here; the store, gc, fsck, ``ls``, the layer indexes and the
mount records all ask this module, so the layout can be read (and changed) without a search::

    CACHE/blobs/sha256/<hex>                       committed blobs: complete, verified, 0444
    CACHE/labels/sha256/<hex>.json                 labels, where the filesystem has no user xattrs
    CACHE/ingest/<ref key>/{data,state}            in-progress writes: sparse data, present ranges
    CACHE/locks/<ref key>.lock                     flock of the one writer of a ref across processes
    CACHE/refs/<registry>/<repository>/<tag>.json  a tag's last resolution
    CACHE/indexes/sha256/<hex>.v<N>                a layer's file index (tar members, gzip checkpoints)
    CACHE/indexes/sha256/<hex>.toc.v<N>            a verified eStargz / zstd:chunked TOC
    CACHE/pieces/sha256/<layer hex>/<sha256>       verified gzip spans / TOC chunks of lazily read layers
    CACHE/mounts/<pid>.json                        live mounts: a mount's lease for gc
    CACHE/logs/<mountpoint>-<name>.log             background mounts' logs

Functions take the cache root (a ``Path`` or ``str``) and return paths; nothing here touches the disk.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the two files of an ingest directory
INGEST_DATA = "data"
INGEST_STATE = "state"


def hex_of(digest: str) -> str:
    """``sha256:<hex>`` -> ``<hex>``, the file name of a digest."""
    return digest.partition(":")[2]


def blobs(root: Path | str) -> Path:
    return Path(root) / "blobs" / "sha256"


def blob(root: Path | str, digest: str) -> Path:
    return blobs(root) / hex_of(digest)


def sidecars(root: Path | str) -> Path:
    return Path(root) / "labels" / "sha256"


def sidecar(root: Path | str, digest: str) -> Path:
    return sidecars(root) / f"{hex_of(digest)}.json"


def ingests(root: Path | str) -> Path:
    return Path(root) / "ingest"


def ingest(root: Path | str, ref: str) -> Path:
    return ingests(root) / ref


def ingest_data(root: Path | str, ref: str) -> Path:
    return ingest(root, ref) / INGEST_DATA


def ingest_state(root: Path | str, ref: str) -> Path:
    return ingest(root, ref) / INGEST_STATE


def locks(root: Path | str) -> Path:
    return Path(root) / "locks"


def lock(root: Path | str, ref: str) -> Path:
    return locks(root) / f"{ref}.lock"


def refs(root: Path | str) -> Path:
    return Path(root) / "refs"


def tag(root: Path | str, name: str, tag: str) -> Path:
    return refs(root) / name / f"{tag}.json"


def indexes(root: Path | str) -> Path:
    return Path(root) / "indexes" / "sha256"


def layer_index(root: Path | str, digest: str, suffix: str) -> Path:
    """``suffix``: the format and its version, e.g. ``v3`` or ``toc.v1``."""
    return indexes(root) / f"{hex_of(digest)}.{suffix}"


def pieces(root: Path | str) -> Path:
    return Path(root) / "pieces" / "sha256"


def pieces_of(root: Path | str, layer_digest: str) -> Path:
    return pieces(root) / hex_of(layer_digest)


def mounts(root: Path | str) -> Path:
    return Path(root) / "mounts"


def mount_record(root: Path | str, pid: int) -> Path:
    return mounts(root) / f"{pid}.json"


def logs(root: Path | str) -> Path:
    return Path(root) / "logs"


def default_cache_dir() -> Path:
    """``$IMAGEFS_CACHE_DIR``, else ``$XDG_CACHE_HOME/imagefs``, else ``~/.cache/imagefs``."""
    if os.environ.get("IMAGEFS_CACHE_DIR"):
        return Path(os.environ["IMAGEFS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagefs"
