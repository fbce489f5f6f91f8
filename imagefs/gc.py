"""``imagefs gc``: mark and sweep the content store, then evict to a size if asked.

Mark, as containerd's collector does: from every blob labelled ``containerd.io/gc.root`` and from
the root of every live mount (its lease, :mod:`imagefs.content.mounts`), follow the
``containerd.io/gc.ref.content.*`` labels — and the manifests' own bodies, in case the labels were
cut short — to everything still referenced. Sweep the rest:

- committed blobs nothing references (except those committed in the last minute: a root is
  renamed into place a moment before its ``gc.root`` label is written, and a collector running in
  that moment must not take it);
- ingests no live process holds (no ref lock, no open data file), unless their blob is
  referenced: a suspended fetch of a referenced blob is kept, so a later mount resumes it;
- layer indexes (``CACHE/indexes``) of layers nothing references, labels of blobs that are gone,
  tags remembered for roots that are gone, stale mount records and lock files no one holds;
- verified pieces (``CACHE/pieces``) of layers nothing references, or whose whole blob is
  committed (it holds every piece).

``--max-size`` then evicts, least recently used first, the suspended ingests, the pieces and the
*layer* blobs of images no live mount uses, until the cache fits. Manifests, indexes and configs are never
evicted — they are small and a mount needs them to start offline — and a layer evicted is
fetched again the first time a mount reads it; its layer index stays, so listing its files
costs nothing.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .content import filelock, labels, layout, maintenance, mounts, pieces
from .content.layout import default_cache_dir
from .content.local import LocalStore
from .units import human

# Blobs this young are never swept: a commit in flight (rename, then labels) must not be raced.
GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class Removal:
    """One thing the collector removed (or, in a dry run, would remove)."""

    kind: str  # blob, ingest, layer index, pieces, labels, tag, mount record, lock
    name: str
    size: int
    reason: str


@dataclass(frozen=True)
class GcResult:
    removed: tuple[Removal, ...]
    freed: int
    blobs_kept: int
    bytes_kept: int  # committed blobs and ingests left
    live_mounts: int
    over_by: int  # how far above --max-size the cache still is (0 if it fits)
    dry_run: bool

    def count(self, kind: str) -> int:
        return sum(1 for r in self.removed if r.kind == kind)


@dataclass
class _Plan:
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)

    def remove(self, removal: Removal, action) -> bool:
        if not self.dry_run and action() is False:
            return False
        self.removed.append(removal)
        return True


def collect(store: LocalStore, *, dry_run: bool = False, max_size: int | None = None,
            grace: float = GRACE_SECONDS) -> GcResult:
    """Mark from the roots and live mounts, sweep, then evict down to ``max_size`` bytes."""
    now = time.time()
    plan = _Plan(dry_run)

    records = mounts.scan(store.root)
    for rec in records.stale:
        plan.remove(Removal("mount record", f"pid {rec.pid} ({rec.mountpoint})", 0, "its process is gone"),
                    lambda rec=rec: mounts.unregister(rec))
    live_roots = [d for rec in records.live for d in (rec.root, *rec.selected)]

    blobs = {b.digest: b for b in maintenance.blob_files(store)}
    roots = maintenance.roots(store, blobs.values())
    graph = maintenance.walk(store, [*roots, *live_roots], blobs)
    leased = maintenance.walk(store, live_roots, blobs).reached

    # -- sweep ---------------------------------------------------------------------------------
    kept: dict[str, maintenance.BlobFile] = {}
    for digest, blob in blobs.items():
        if digest in graph.reached or now - blob.mtime < grace:
            kept[digest] = blob
            continue
        mt = maintenance.media_type(store, blob, maintenance.safe_labels(store, digest))
        plan.remove(Removal("blob", maintenance.describe(digest, mt), blob.size, "unreferenced"),
                    lambda d=digest: maintenance.remove_blob(store, d))

    open_files = maintenance.open_ingest_files(store)
    suspended: list[maintenance.Ingest] = []
    ingest_bytes = 0
    for ingest in maintenance.ingests(store):
        use = maintenance.ingest_use(store, ingest, open_files, grace)
        if use.held:
            ingest_bytes += ingest.disk_bytes
            continue
        if ingest.state is None or ingest.digest is None:
            reason = "no valid state file"
        elif ingest.digest in kept:
            reason = "its blob is committed"
        elif ingest.digest in graph.reached:
            suspended.append(ingest)  # a referenced blob, part fetched: kept for resuming
            ingest_bytes += ingest.disk_bytes
            continue
        else:
            reason = "stale, and its blob is unreferenced"
        plan.remove(Removal("ingest", ingest.ref, ingest.disk_bytes, reason),
                    lambda i=ingest: maintenance.remove_ingest(store, i))

    _sweep_small_files(store, plan, set(kept), now, grace)
    _sweep_layer_indexes(store, plan, graph.reached, now, grace)
    kept_pieces = _sweep_pieces(store, plan, set(kept), graph.reached, now, grace)
    for tag in maintenance.tag_records(store):
        if tag.digest is not None and tag.digest not in kept and now - _mtime(tag.path) > grace:
            plan.remove(Removal("tag", tag.name, 0, f"remembered {tag.digest}, which is gone"),
                        lambda t=tag: t.path.unlink(missing_ok=True))

    # -- evict ---------------------------------------------------------------------------------
    total = sum(b.size for b in kept.values()) + ingest_bytes + sum(p.size for p in kept_pieces)
    over_by = 0
    if max_size is not None and total > max_size:
        candidates: list[tuple[float, int, str, object]] = [
            (i.mtime, -i.disk_bytes, "ingest", i) for i in suspended if i.digest not in leased]
        candidates += [(p.mtime, -p.size, "pieces", p) for p in kept_pieces if p.layer not in leased]
        for digest, blob in kept.items():
            mt = graph.media_types.get(digest) or maintenance.safe_labels(store, digest).get(labels.MEDIATYPE)
            if digest in leased or not maintenance.is_layer(mt) or now - blob.mtime < grace:
                continue
            candidates.append((blob.last_used, -blob.size, "blob", blob))
        candidates.sort(key=lambda c: c[:2])  # oldest first; of equals, the biggest: fewer refetches later
        for last_used, _, kind, item in candidates:
            if total <= max_size:
                break
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last_used))
            if kind == "ingest":
                assert isinstance(item, maintenance.Ingest)
                if plan.remove(Removal("ingest", item.ref, item.disk_bytes, f"evicted: partial fetch, last written {when}"),
                               lambda i=item: maintenance.remove_ingest(store, i)):
                    total -= item.disk_bytes
            elif kind == "pieces":
                assert isinstance(item, pieces.Kept)
                if plan.remove(Removal("pieces", item.name, item.size, f"evicted: last added to {when}"),
                               lambda d=item.dir: shutil.rmtree(d, ignore_errors=True)):
                    total -= item.size
            else:
                assert isinstance(item, maintenance.BlobFile)
                name = maintenance.describe(item.digest, graph.media_types.get(item.digest))
                if plan.remove(Removal("blob", name, item.size, f"evicted: least recently used, last used {when}"),
                               lambda d=item.digest: maintenance.remove_blob(store, d)):
                    total -= item.size
                    kept.pop(item.digest)
        over_by = max(total - max_size, 0)

    freed = sum(r.size for r in plan.removed)
    return GcResult(tuple(plan.removed), freed, len(kept), total, len(records.live), over_by, dry_run)


def _sweep_small_files(store: LocalStore, plan: _Plan, kept: set[str], now: float, grace: float) -> None:
    """Labels of blobs that are gone, temporary files of dead writers, lock files no one holds."""
    sidecars = maintenance.sidecar_dir(store)
    if sidecars.is_dir():
        for p in sidecars.iterdir():
            hex_ = p.name[: -len(".json")] if p.name.endswith(".json") else ""
            orphan = maintenance.HEX_RE.match(hex_) and f"sha256:{hex_}" not in kept
            leftover = p.name.startswith(".") and p.name.endswith(".tmp") and now - _mtime(p) > grace
            if orphan and now - _mtime(p) > grace or leftover:
                plan.remove(Removal("labels", p.name, _size(p), "its blob is gone" if orphan else "left by a dead writer"),
                            lambda p=p: p.unlink(missing_ok=True))
    locks = layout.locks(store.root)
    if locks.is_dir():
        for p in locks.glob("*.lock"):
            ref = p.name[: -len(".lock")]
            if now - _mtime(p) < grace or filelock.holder(store.root, ref) is not None:
                continue

            def release(ref=ref) -> bool:
                lock = filelock.try_lock(store.root, ref)
                if lock is None:
                    return False
                lock.close()  # closing unlinks the file
                return True

            plan.remove(Removal("lock", p.name, 0, "no one holds it"), release)


def _sweep_layer_indexes(store: LocalStore, plan: _Plan, reached: set[str], now: float, grace: float) -> None:
    """``CACHE/indexes/sha256/<hex>.v<N>`` (the files of a layer, built once) go with their layer's last
    reference — not with its blob: an index outlives a layer evicted by ``--max-size``, so a later mount
    lists the layer's files without fetching it whole again."""
    d = layout.indexes(store.root)
    if not d.is_dir():
        return
    for p in d.iterdir():
        if now - _mtime(p) < grace:
            continue
        hex_ = p.name.split(".", 1)[0]
        if p.name.startswith("."):
            reason = "left by a dead writer"
        elif maintenance.HEX_RE.match(hex_) and f"sha256:{hex_}" not in reached:
            reason = "its layer is unreferenced"
        else:
            continue
        plan.remove(Removal("layer index", p.name, _size(p), reason), lambda p=p: p.unlink(missing_ok=True))


def _sweep_pieces(store: LocalStore, plan: _Plan, committed: set[str], reached: set[str], now: float,
                  grace: float) -> list[pieces.Kept]:
    """``CACHE/pieces/sha256/<layer hex>/``: gone with the layer's last reference, or once its whole
    blob is committed; the rest is returned, for ``--max-size``."""
    left = []
    for found in pieces.kept(store.root):
        if found.layer in committed:
            reason = "its blob is committed"
        elif (found.layer not in reached or not maintenance.HEX_RE.match(found.layer.partition(":")[2])) \
                and now - found.mtime >= grace:
            reason = "its layer is unreferenced"
        else:
            left.append(found)
            continue
        plan.remove(Removal("pieces", found.name, found.size, reason), lambda d=found.dir: shutil.rmtree(d, ignore_errors=True))
    return left


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return time.time()


def _size(p: Path) -> int:
    try:
        return p.lstat().st_size
    except OSError:
        return 0


def report(result: GcResult, out=sys.stdout) -> None:
    verb = "would remove" if result.dry_run else "removed"
    for r in result.removed:
        size = f" {human(r.size)}" if r.kind in ("blob", "ingest", "layer index", "pieces") else ""
        print(f"{verb} {r.kind} {r.name}{size} ({r.reason})", file=out)
    counts = [(result.count("blob"), "blob", "blobs"), (result.count("ingest"), "ingest", "ingests"),
              (result.count("pieces"), "layer's pieces", "layers' pieces")]
    if any(n for n, _, _ in counts):
        parts = [f"{n} {one if n == 1 else many}" for n, one, many in counts if n]
        what = " and ".join(parts)
        head = f"gc: {verb} {what}, {'would free' if result.dry_run else 'freed'} {human(result.freed)}"
    else:
        head = "gc: nothing to remove" if not result.removed else f"gc: {verb} only bookkeeping files"
    leases = f"; {result.live_mounts} live mount{'s' if result.live_mounts != 1 else ''}" if result.live_mounts else ""
    print(f"{head}; the cache {'would hold' if result.dry_run else 'holds'} {result.blobs_kept} blobs, "
          f"{human(result.bytes_kept)}{leases}", file=out)
    if result.over_by:
        print(f"gc: still {human(result.over_by)} over the size asked: the rest is in use by live mounts, "
              "or is manifests, indexes and configs, which are never evicted", file=out)


def run(args) -> int:
    """``imagefs gc [--dry-run] [--max-size SIZE]``; exit 0 once done."""
    root = (args.cache_dir or default_cache_dir())
    if not root.is_dir():
        print(f"gc: no cache at {root}: nothing to do")
        return 0
    result = collect(LocalStore(root), dry_run=args.dry_run, max_size=args.max_size)
    report(result)
    return 0

