"""What ``gc``, ``fsck`` and ``ls`` need of the content store beyond reading and writing blobs.

These functions look at the store's directories as DESIGN.md §3 lays them out (``blobs/sha256``,
``labels/sha256``, ``ingest/<ref key>``, ``refs/``) and use only :class:`LocalStore`'s public
surface for labels, so the store itself stays small (containerd keeps its ``Manager`` separate
from the ``Provider`` and ``Ingester`` in the same way).

The graph a collector follows is the ``containerd.io/gc.ref.content.*`` labels. A manifest's own
bytes are read as well, because labels can be cut short: ext4 gives all the xattrs of one file a
single 4 KiB block, so an index of more than about 35 entries cannot keep all its labels there.
Following both means a collector never sweeps a child the labels forgot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..descriptors import (
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    Descriptor,
    children,
    ref_key,
    sniff_media_type,
)
from ..descriptors import SHA256_RE
from ..errors import ImagefsError
from . import filelock, layout
from .diskio import atomic_write
from .labels import GC_REF, GC_ROOT, MEDIATYPE
from .local import LocalStore

HEX_RE = re.compile(r"^[a-f0-9]{64}$")
DIGEST_RE = SHA256_RE  # for gc and fsck


@dataclass(frozen=True)
class BlobFile:
    """A committed blob as it lies on disk."""

    digest: str
    path: Path
    size: int
    atime: float
    mtime: float

    @property
    def last_used(self) -> float:
        """When anything last read it, as far as the disk knows (see :func:`touch`)."""
        return max(self.atime, self.mtime)


@dataclass(frozen=True)
class Ingest:
    """An in-progress (or abandoned) write: ``CACHE/ingest/<ref key>/``."""

    ref: str
    path: Path
    state: dict | None  # None when the state file is missing or not JSON
    disk_bytes: int  # blocks really used: the data file is sparse
    mtime: float

    @property
    def digest(self) -> str | None:
        d = self.state.get("digest") if self.state else None
        return d if isinstance(d, str) and DIGEST_RE.match(d) else None


def blob_files(store: LocalStore) -> Iterator[BlobFile]:
    """Every committed blob, by its file name (names that are not digests are skipped)."""
    try:
        entries = list(os.scandir(store.blobs))
    except FileNotFoundError:
        return
    for entry in entries:
        if not HEX_RE.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed under us
        yield BlobFile(f"sha256:{entry.name}", Path(entry.path), st.st_size, st.st_atime, st.st_mtime)


def stray_blob_entries(store: LocalStore) -> list[Path]:
    """Entries of ``blobs/sha256`` that are not named by a digest or not regular files."""
    try:
        entries = list(os.scandir(store.blobs))
    except FileNotFoundError:
        return []
    return [Path(e.path) for e in entries if not HEX_RE.match(e.name) or not e.is_file(follow_symlinks=False)]


def sidecar_dir(store: LocalStore) -> Path:
    return layout.sidecars(store.root)


def sidecar_path(store: LocalStore, digest: str) -> Path:
    return layout.sidecar(store.root, digest)


def safe_labels(store: LocalStore, digest: str) -> dict[str, str]:
    """The blob's labels, or ``{}`` when its sidecar is unreadable (fsck reports that)."""
    try:
        labels = store.labels(digest)
    except (OSError, ValueError):
        return {}
    return labels if isinstance(labels, dict) else {}


def ref_labels(labels: dict[str, str]) -> list[tuple[int, str]]:
    """``gc.ref.content.<i>`` labels as ``(i, value)``, in ``i`` order (non-numeric ``i`` last)."""
    out = []
    for k, v in labels.items():
        if k.startswith(GC_REF):
            suffix = k[len(GC_REF):]
            out.append((int(suffix) if suffix.isdigit() else 1 << 62, str(v)))
    return sorted(out)


def media_type(store: LocalStore, blob: BlobFile, labels: dict[str, str]) -> str | None:
    """The blob's media type: its label, else sniffed from a small JSON body."""
    mt = labels.get(MEDIATYPE)
    if mt:
        return mt
    if blob.size > MAX_MANIFEST_SIZE:
        return None
    try:
        head = blob.path.read_bytes()
        return sniff_media_type(head, None)
    except (OSError, ImagefsError):
        return None


def parsed_children(store: LocalStore, digest: str, mt: str | None, size: int) -> list[Descriptor] | None:
    """The children a committed manifest or index lists, or None if it is not one (or unreadable)."""
    if mt not in MANIFEST_TYPES and mt not in INDEX_TYPES:
        return None
    if size > MAX_MANIFEST_SIZE:
        return None
    path = layout.blob(store.root, digest)
    try:
        data = path.read_bytes()
        return children(Descriptor(mt, digest, len(data)), data)
    except (OSError, ImagefsError):
        return None


@dataclass
class Graph:
    """What is reachable from a set of roots through labels and manifest bodies.

    ``media_types`` holds what parents say about each reached digest (a blob's own label may be
    missing); ``sizes`` likewise, so uncommitted children are still known by size.
    """

    reached: set[str] = field(default_factory=set)
    media_types: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    platforms: dict[str, str] = field(default_factory=dict)


def walk(store: LocalStore, roots: Iterable[str], blobs: dict[str, BlobFile] | None = None) -> Graph:
    """Mark everything reachable from ``roots`` (digests), following labels and bodies."""
    if blobs is None:
        blobs = {b.digest: b for b in blob_files(store)}
    graph = Graph()
    stack = [r for r in roots if DIGEST_RE.match(r)]
    while stack:
        digest = stack.pop()
        if digest in graph.reached:
            continue
        graph.reached.add(digest)
        blob = blobs.get(digest)
        if blob is None:
            continue  # not fetched (a layer never read): nothing below it is on disk either
        labels = safe_labels(store, digest)
        kids = [v for _, v in ref_labels(labels) if DIGEST_RE.match(v)]
        mt = graph.media_types.get(digest) or media_type(store, blob, labels)
        if mt:
            graph.media_types.setdefault(digest, mt)
        for kid in parsed_children(store, digest, mt, blob.size) or []:
            graph.media_types.setdefault(kid.digest, kid.media_type)
            graph.sizes.setdefault(kid.digest, kid.size)
            if kid.platform is not None:
                graph.platforms.setdefault(kid.digest, str(kid.platform))
            kids.append(kid.digest)
        stack.extend(k for k in kids if k not in graph.reached)
    return graph


def roots(store: LocalStore, blobs: Iterable[BlobFile]) -> list[str]:
    """Digests of committed blobs labelled ``containerd.io/gc.root``."""
    return [b.digest for b in blobs if GC_ROOT in safe_labels(store, b.digest)]


def is_layer(mt: str | None) -> bool:
    return mt in LAYER_TYPES


def describe(digest: str, mt: str | None) -> str:
    """A ref key when the media type is known (``layer-sha256:…``), else the digest."""
    return ref_key(Descriptor(mt, digest, 0)) if mt else digest


def remove_blob(store: LocalStore, digest: str) -> None:
    """Delete a committed blob and its sidecar labels (a reader with it open keeps its bytes)."""
    store.delete(digest)


def write_sidecar(store: LocalStore, digest: str, labels: dict[str, str]) -> None:
    """Keep ``labels`` beside the blob; the store reads a sidecar before any xattr."""
    p = sidecar_path(store, digest)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, json.dumps(labels, sort_keys=True).encode())


def touch(store: LocalStore, digests: Iterable[str]) -> None:
    """Mark blobs as used now (their atime), for least-recently-used eviction.

    The kernel's relatime updates an atime at most once a day, so mounts and pulls say it
    themselves. Best effort: a blob gone or not ours is simply skipped.
    """
    now = time.time()
    for digest in digests:
        p = layout.blob(store.root, digest)
        try:
            st = p.stat()
            os.utime(p, (now, st.st_mtime))
        except OSError:
            pass


# -- ingests ---------------------------------------------------------------------------------------


def ingests(store: LocalStore) -> list[Ingest]:
    out = []
    try:
        entries = list(os.scandir(store.ingests))
    except FileNotFoundError:
        return []
    for entry in entries:
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            out.append(Ingest(entry.name, path, None, _disk_bytes(path), _mtime(path)))
            continue
        try:
            state = json.loads((path / layout.INGEST_STATE).read_text())
            if not isinstance(state, dict):
                state = None
        except (OSError, ValueError):
            state = None
        try:
            files = [path, *path.iterdir()]
        except OSError:  # removed or replaced under us
            files = [path]
        out.append(Ingest(entry.name, path, state, sum(_disk_bytes(f) for f in files[1:]), max(_mtime(f) for f in files)))
    return out


def open_ingest_files(store: LocalStore) -> set[Path] | None:
    """Files under ``CACHE/ingest`` some process has open, from ``/proc/*/fd``; None if unknowable.

    A writer keeps its ingest's data file open from start to commit; this sees writers that take
    no file lock. Without permission to look at every process, the answer is None (unknown).
    """
    prefix = str(store.ingests.resolve()) + os.sep
    found: set[Path] = set()
    complete = True
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        except PermissionError:
            complete = False
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                found.add(Path(target))
    return found if complete or found else None


@dataclass(frozen=True)
class IngestUse:
    held: bool
    why: str


def ingest_use(store: LocalStore, ingest: Ingest, open_files: set[Path] | None, grace: float) -> IngestUse:
    """Whether a live process holds ``ingest``: its ref lock, an open data file, or very recent writes."""
    h = filelock.holder(store.root, ingest.ref) if _valid_ref(ingest.ref) else None
    if h is not None:
        return IngestUse(True, h.describe())
    if open_files is not None:
        resolved = ingest.path.resolve()
        if any(resolved == f.parent or resolved in f.parents for f in open_files):
            return IngestUse(True, "open by a live process")
    age = time.time() - ingest.mtime
    if age < grace or open_files is None and age < 3600:
        return IngestUse(True, f"written {age:.0f}s ago")
    return IngestUse(False, "no live writer")


def remove_ingest(store: LocalStore, ingest: Ingest) -> bool:
    """Remove an ingest no one holds, holding its ref lock meanwhile so no writer starts on it."""
    lock = filelock.try_lock(store.root, ingest.ref) if _valid_ref(ingest.ref) else None
    if _valid_ref(ingest.ref) and lock is None:
        return False
    try:
        if ingest.path.is_dir() and not ingest.path.is_symlink():
            shutil.rmtree(ingest.path, ignore_errors=True)
        else:
            ingest.path.unlink(missing_ok=True)
        return True
    finally:
        if lock is not None:
            lock.close()


def _valid_ref(ref: str) -> bool:
    return bool(ref) and "/" not in ref and not ref.startswith(".")


def _disk_bytes(p: Path) -> int:
    try:
        return os.lstat(p).st_blocks * 512
    except OSError:
        return 0


def _mtime(p: Path) -> float:
    try:
        return os.lstat(p).st_mtime
    except OSError:
        return 0.0


# -- tag memory ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagRecord:
    name: str  # registry/repository:tag
    path: Path
    digest: str | None  # None when the record cannot be read
    resolved: str | None


def tag_records(store: LocalStore) -> list[TagRecord]:
    """``CACHE/refs/<registry>/<repository>/<tag>.json``: what each tag last resolved to."""
    base = layout.refs(store.root)
    out = []
    if not base.is_dir():
        return out
    for p in sorted(base.rglob("*.json")):
        rel = p.relative_to(base)
        name = "/".join(rel.parts[:-1]) + ":" + p.name[: -len(".json")]
        try:
            doc = json.loads(p.read_text())
            desc = Descriptor.from_json(doc["descriptor"])
            out.append(TagRecord(name, p, desc.digest, str(doc.get("resolved") or "")))
        except (OSError, ValueError, KeyError, TypeError, ImagefsError):
            out.append(TagRecord(name, p, None, None))
    return out
