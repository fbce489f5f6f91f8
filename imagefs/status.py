"""``imagefs ls`` (``status``): what the cache holds, image by image, and the live mounts.

An image is a root of the store: a blob labelled ``containerd.io/gc.root`` (or the root of a
live mount). Its names come from the tag memory (``CACHE/refs/…``) and from mounts using it;
its sizes from walking its graph — *cached* is what is on disk, *known* what the manifests on
disk describe (layers of a platform whose manifest was never fetched are unknown). Stale mount
records are removed on the way, as ``gc`` does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from .content import maintenance, mounts, pieces
from .content.layout import default_cache_dir
from .content.local import LocalStore
from .descriptors import INDEX_TYPES, Descriptor, children
from .errors import ImagefsError
from .units import human


@dataclass(frozen=True)
class ImageStatus:
    root: str
    ref_key: str
    names: tuple[str, ...]
    platforms: tuple[str, ...]  # platforms whose manifests are cached
    platforms_missing: tuple[str, ...]  # listed by the index, manifest not cached
    blobs_cached: int
    bytes_cached: int
    bytes_known: int
    last_used: float
    mounted: bool


@dataclass(frozen=True)
class CacheStatus:
    path: str
    blobs: int
    bytes: int
    ingests: int
    ingest_bytes: int
    pieces: int  # verified pieces of layers whose blob is not here (CACHE/pieces)
    piece_bytes: int
    unreferenced_blobs: int
    unreferenced_bytes: int
    images: tuple[ImageStatus, ...]
    mounts: tuple[mounts.MountRecord, ...]


def status(store: LocalStore) -> CacheStatus:
    live = mounts.live_mounts(store.root, clean=True)
    blobs = {b.digest: b for b in maintenance.blob_files(store)}
    tags: dict[str, list[str]] = {}
    for t in maintenance.tag_records(store):
        if t.digest:
            tags.setdefault(t.digest, []).append(t.name)
    roots = list(dict.fromkeys([*maintenance.roots(store, blobs.values()), *(m.root for m in live)]))
    images = []
    reached_any: set[str] = set()
    for root in roots:
        graph = maintenance.walk(store, [root], blobs)
        reached_any |= graph.reached
        cached = [d for d in graph.reached if d in blobs]
        known = sum(blobs[d].size if d in blobs else graph.sizes.get(d, 0) for d in graph.reached)
        mt = graph.media_types.get(root, "")
        have, missing = _platforms(store, root, mt, blobs)
        names = tags.get(root, []) + [m.ref for m in live if m.root == root and m.ref not in tags.get(root, [])]
        images.append(ImageStatus(
            root=root,
            ref_key=maintenance.describe(root, mt or None),
            names=tuple(names),
            platforms=tuple(have),
            platforms_missing=tuple(missing),
            blobs_cached=len(cached),
            bytes_cached=sum(blobs[d].size for d in cached),
            bytes_known=known,
            last_used=max((blobs[d].last_used for d in cached), default=0.0),
            mounted=any(m.root == root for m in live),
        ))
    images.sort(key=lambda i: -i.last_used)
    ingests = maintenance.ingests(store)
    unref = [b for d, b in blobs.items() if d not in reached_any]
    kept = pieces.kept(store.root)
    return CacheStatus(
        path=str(store.root),
        blobs=len(blobs),
        bytes=sum(b.size for b in blobs.values()),
        ingests=len(ingests),
        ingest_bytes=sum(i.disk_bytes for i in ingests),
        pieces=sum(len(k.files) for k in kept),
        piece_bytes=sum(k.size for k in kept),
        unreferenced_blobs=len(unref),
        unreferenced_bytes=sum(b.size for b in unref),
        images=tuple(images),
        mounts=tuple(live),
    )


def _platforms(store: LocalStore, root: str, mt: str, blobs) -> tuple[list[str], list[str]]:
    """Platforms an index root lists: those whose manifest is cached, and the others."""
    if mt not in INDEX_TYPES or root not in blobs:
        return [], []
    try:
        kids = children(Descriptor(mt, root, blobs[root].size), blobs[root].path.read_bytes())
    except (OSError, ImagefsError):
        return [], []
    have, missing = [], []
    for kid in kids:
        if kid.platform is not None:
            (have if kid.digest in blobs else missing).append(str(kid.platform))
    return list(dict.fromkeys(have)), list(dict.fromkeys(p for p in missing if p not in have))


def report(st: CacheStatus, out=sys.stdout) -> None:
    print(f"cache {st.path}: {st.blobs} blobs, {human(st.bytes)}"
          + (f"; {st.ingests} ingests, {human(st.ingest_bytes)} partly fetched" if st.ingests else "")
          + (f"; {st.pieces} verified pieces of lazily read layers, {human(st.piece_bytes)}" if st.pieces else ""), file=out)
    if st.images:
        rows = [("IMAGE", "ROOT", "PLATFORMS", "CACHED", "MOUNTED")]
        for img in st.images:
            plats = ", ".join(img.platforms) or "-"
            if img.platforms_missing:
                plats += f" (+{len(img.platforms_missing)} not fetched)"
            rows.append((
                ", ".join(img.names) or "-",
                img.ref_key.split(":", 1)[0] + ":" + img.root.split(":", 1)[1][:12],
                plats,
                f"{human(img.bytes_cached)} of {human(img.bytes_known)}",
                "yes" if img.mounted else "",
            ))
        _table(rows, out)
    else:
        print("no images", file=out)
    if st.unreferenced_blobs:
        print(f"unreferenced: {st.unreferenced_blobs} blobs, {human(st.unreferenced_bytes)} (imagefs gc removes them)", file=out)
    if st.mounts:
        print("", file=out)
        rows = [("PID", "MOUNTPOINT", "IMAGE", "SINCE")]
        rows += [(str(m.pid), m.mountpoint, m.ref, m.started) for m in st.mounts]
        _table(rows, out)
    else:
        print("no live mounts", file=out)


def _table(rows: list[tuple[str, ...]], out) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def to_json(st: CacheStatus) -> dict:
    doc = asdict(st)
    doc["mounts"] = [m.to_json() for m in st.mounts]
    return doc


def run(args) -> int:
    root = args.cache_dir or default_cache_dir()
    if not root.is_dir():
        if args.json:
            print(json.dumps({"path": str(root), "blobs": 0, "images": [], "mounts": []}))
        else:
            print(f"cache {root}: empty (no such directory)")
        return 0
    st = status(LocalStore(root))
    if args.json:
        print(json.dumps(to_json(st), indent=2))
    else:
        report(st)
    return 0
