"""``imagefs fsck [--repair]``: check that the content store holds what it claims.

- Every committed blob is hashed again (in worker threads, a bounded buffer each, reading with
  ``O_NOATIME`` so a check does not make every blob look recently used to ``gc --max-size``).
- Labels: a media type on every blob; ``gc.ref.content.*`` values that are digests; and on a
  manifest or index, ``gc.ref`` labels that list exactly its children — labels cut short by a full
  xattr block would let a collector lose content.
- Sidecar label files without a blob, ingests whose state is unreadable, unreadable tag and
  mount records.
- Verified pieces of lazily read layers (``CACHE/pieces``): each is hashed against its name. A
  mount never serves a wrong one (it re-hashes on load), but fsck should say the disk lies.
- diff_ids: a layer that a cached manifest lists (its ``gc.ref`` labels) under a cached config is
  inflated in the pass that re-hashes it, and compared with the config's ``rootfs.diff_ids``. A
  mismatch is a *warning*: the blob is what the registry holds, nothing in the cache is wrong
  and nothing can be repaired, so it does not change the exit status (as notes do not). A
  ``containerd.io/uncompressed`` label that disagrees with the inflated bytes is a problem
  (``pull`` trusts it); ``--repair`` rewrites it.

``--repair`` removes what is wrong (a removed blob is fetched again by the next mount that needs
it) and rewrites labels it can derive from a manifest's own verified bytes. Stale ingests, stale
mount records and tags remembered for a root no longer cached are only noted: they are ``gc``'s
to sweep, not errors.

Exit status: 0 clean, 1 problems found (the last line says whether they were repaired), 2 usage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .content import layout, maintenance, mounts, pieces
from .content.labels import GC_REF, MEDIATYPE, UNCOMPRESSED
from .content.layout import default_cache_dir
from .content.local import XATTR_PREFIX, LocalStore
from .descriptors import INDEX_TYPES, MANIFEST_TYPES, MAX_MANIFEST_SIZE, Descriptor, children
from .errors import ImagefsError, InvalidManifest, NotFound
from .layers import diffids
from .units import human

EXIT_CLEAN, EXIT_PROBLEMS = 0, 1
HASH_BUFFER = 1 << 20


@dataclass(frozen=True)
class Finding:
    """One thing found: ``problem`` ones set the exit status, notes do not."""

    subject: str
    message: str
    problem: bool = True
    repaired: str = ""  # what --repair did, empty if nothing
    warning: bool = False  # not a problem of the cache, but worth saying (a wrong diff_id)


@dataclass(frozen=True)
class FsckResult:
    findings: tuple[Finding, ...]
    blobs: int
    bytes: int
    ingests: int
    tags: int
    repair: bool

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.warning]


@dataclass
class _Checker:
    store: LocalStore
    repair: bool
    findings: list[Finding] = field(default_factory=list)

    def found(self, subject: str, message: str, fix=None, *, how: str = "removed", problem: bool = True,
              warning: bool = False) -> None:
        repaired = ""
        if self.repair and fix is not None:
            try:
                fix()
                repaired = how
            except OSError as exc:
                repaired = f"repair failed: {exc.strerror or exc}"
        self.findings.append(Finding(subject, message, problem, repaired, warning))


def hash_file(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in bounded chunks without touching its atime."""
    fd = _open_noatime(path)
    h = hashlib.sha256()
    buf = bytearray(HASH_BUFFER)
    view = memoryview(buf)
    try:
        while n := os.readv(fd, [buf]):
            h.update(view[:n])  # hashlib releases the GIL for large updates: threads really overlap
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()


def check(store: LocalStore, *, repair: bool = False, workers: int | None = None) -> FsckResult:
    c = _Checker(store, repair)

    for p in maintenance.stray_blob_entries(store):
        c.found(f"blobs/sha256/{p.name}", "not a committed blob (the name is not a sha256 digest, or not a file)",
                lambda p=p: shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True))

    blobs = {b.digest: b for b in maintenance.blob_files(store)}
    expected = _listed_diff_ids(store, blobs)
    workers = workers or min(4, os.cpu_count() or 2)
    with ThreadPoolExecutor(workers, thread_name_prefix="fsck-hash") as pool:
        both = list(pool.map(_safe_hash_both, [b.path for b in blobs.values()], [d in expected for d in blobs]))
    hashes = {d: h for d, (h, _) in zip(blobs, both)}
    inflated = {d: u for d, (_, u) in zip(blobs, both) if u is not None}
    good: dict[str, maintenance.BlobFile] = {}
    for digest, actual in hashes.items():
        if actual is None:
            continue  # removed while we looked (a gc running beside us): nothing to check
        if actual == digest:
            good[digest] = blobs[digest]
        else:
            c.found(f"blob {digest}", f"content has digest {actual}" if actual.startswith("sha256:") else actual,
                    lambda d=digest: maintenance.remove_blob(store, d))

    graph = maintenance.walk(store, list(good), good)  # what parents say of each blob's media type
    for digest, blob in good.items():
        _check_labels(c, digest, blob, graph)
    _check_diff_ids(c, expected, {d: u for d, u in inflated.items() if d in good}, good)

    sidecars = maintenance.sidecar_dir(store)
    if sidecars.is_dir():
        for p in sidecars.glob("*.json"):
            hex_ = p.name[: -len(".json")]
            if f"sha256:{hex_}" not in good:
                c.found(f"labels/sha256/{p.name}", "labels of a blob that is not in the store",
                        lambda p=p: p.unlink(missing_ok=True))

    _check_pieces(c, store, workers)

    ingests = maintenance.ingests(store)
    open_files = maintenance.open_ingest_files(store)
    for ingest in ingests:
        _check_ingest(c, ingest, open_files)

    tags = maintenance.tag_records(store)
    for tag in tags:
        if tag.digest is None:
            c.found(f"tag {tag.name}", f"unreadable record {tag.path}", lambda t=tag: t.path.unlink(missing_ok=True))
        elif tag.digest not in good:
            c.found(f"tag {tag.name}", f"remembers {tag.digest}, which is not in the store; imagefs gc removes it",
                    problem=False)

    records = mounts.scan(store.root)
    for p in records.unreadable:
        c.found(f"mount record {p.name}", "unreadable", lambda p=p: p.unlink(missing_ok=True))
    for rec in records.stale:
        c.found(f"mount record {rec.path.name if rec.path else rec.pid}",
                f"stale: process {rec.pid} ({rec.mountpoint}) is gone; imagefs gc removes it", problem=False)

    size = sum(b.size for b in blobs.values())
    return FsckResult(tuple(c.findings), len(blobs), size, len(ingests), len(tags), repair)


def _check_pieces(c: _Checker, store: LocalStore, workers: int) -> None:
    files = [p for layer in pieces.kept(store.root) for p in layer.files]
    with ThreadPoolExecutor(workers, thread_name_prefix="fsck-hash") as pool:
        for p, actual in zip(files, pool.map(_safe_hash, files)):
            if actual is not None and actual != f"sha256:{p.name}":
                c.found(f"pieces/sha256/{p.parent.name}/{p.name}",
                        f"content has digest {actual}" if actual.startswith("sha256:") else actual,
                        lambda p=p: p.unlink(missing_ok=True))


def _listed_diff_ids(store: LocalStore, blobs: dict[str, maintenance.BlobFile]) -> dict[str, list[tuple[str, str, str]]]:
    """layer digest -> (manifest, config, diff_id) for each cached manifest that lists it (its
    gc.ref labels: config first, then layers) under a cached config with ``rootfs.diff_ids``."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for digest in blobs:
        labels = maintenance.safe_labels(store, digest)
        if labels.get(MEDIATYPE) not in MANIFEST_TYPES:
            continue
        refs = [v for _, v in maintenance.ref_labels(labels)]
        config = blobs.get(refs[0]) if refs else None
        if config is None or config.size > MAX_MANIFEST_SIZE:
            continue
        try:
            listed = diffids.diff_ids(config.path.read_bytes())
        except OSError:
            continue
        for layer, diff_id in zip(refs[1:], listed):
            out.setdefault(layer, []).append((digest, config.digest, diff_id))
    return out


def _check_diff_ids(c: _Checker, expected: dict[str, list[tuple[str, str, str]]], inflated: dict[str, str],
                    good: dict[str, maintenance.BlobFile]) -> None:
    store = c.store
    names = _image_names(store, good)
    for layer, actual in inflated.items():
        subject = maintenance.describe(layer, maintenance.safe_labels(store, layer).get(MEDIATYPE))
        label = maintenance.safe_labels(store, layer).get(UNCOMPRESSED)
        if label and label != actual:
            c.found(subject, f"label {UNCOMPRESSED}={label!r}, but it inflates to {actual}",
                    lambda d=layer, a=actual: store.update_labels(d, {UNCOMPRESSED: a}), how="labels rewritten")
        for manifest, config, diff_id in expected.get(layer, ()):
            if diff_id != actual and manifest in good and config in good:
                image = f"manifest {manifest}" + (f" ({', '.join(names[manifest])})" if names.get(manifest) else "")
                c.found(subject, diffids.mismatch("it", actual, diff_id, image), problem=False, warning=True)


def _image_names(store: LocalStore, good: dict[str, maintenance.BlobFile]) -> dict[str, list[str]]:
    """manifest digest -> the remembered tags whose image reaches it."""
    out: dict[str, list[str]] = {}
    for tag in maintenance.tag_records(store):
        if tag.digest in good:
            for digest in maintenance.walk(store, [tag.digest], good).reached:
                out.setdefault(digest, []).append(tag.name)
    return out


def _safe_hash_both(path: Path, inflate: bool) -> tuple[str | None, str | None]:
    """(digest or why not, uncompressed digest when ``inflate`` and the layer inflates)."""
    if not inflate:
        return _safe_hash(path), None
    try:
        fd = _open_noatime(path)
        try:
            return diffids.digests(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}", None


def _open_noatime(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME is for the owner only
        return os.open(path, os.O_RDONLY)


def _safe_hash(path: Path) -> str | None:
    try:
        return hash_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


def _check_labels(c: _Checker, digest: str, blob: maintenance.BlobFile, graph: maintenance.Graph) -> None:
    store = c.store
    subject = f"blob {digest}"
    sidecar = maintenance.sidecar_path(store, digest)
    if sidecar.exists():
        try:
            doc = json.loads(sidecar.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            c.found(subject, f"unreadable labels file {sidecar.name}: {exc}", lambda: sidecar.unlink(missing_ok=True))
            return
    labels = maintenance.safe_labels(store, digest)
    mt = labels.get(MEDIATYPE) or graph.media_types.get(digest)
    fixed = dict(labels)

    if not labels.get(MEDIATYPE):
        if mt:
            fixed[MEDIATYPE] = mt
        else:
            c.found(subject, "no media type label, and no manifest in the store lists it",
                    lambda: maintenance.remove_blob(store, digest))
            return
    bad_refs = [k for k, v in labels.items() if k.startswith(GC_REF) and not maintenance.DIGEST_RE.match(str(v))]
    for k in bad_refs:
        fixed.pop(k)

    if mt in MANIFEST_TYPES or mt in INDEX_TYPES:
        try:
            if blob.size > MAX_MANIFEST_SIZE:
                raise InvalidManifest(f"{blob.size} bytes is over the manifest size limit")
            kids = children(Descriptor(mt, digest, blob.size), blob.path.read_bytes())
        except (OSError, ImagefsError) as exc:
            c.found(subject, f"a {mt} that cannot be read: {exc}", lambda: maintenance.remove_blob(store, digest))
            return
        want = {f"{GC_REF}{i}": kid.digest for i, kid in enumerate(kids)}
        have = {k: v for k, v in labels.items() if k.startswith(GC_REF)}
        if have != want:
            for k in have:
                fixed.pop(k, None)
            fixed.update(want)
            missing = len(set(want.items()) - set(have.items()))
            wrong = sorted(set(have.items()) - set(want.items()))
            shown = "".join(f"; {k.removeprefix('containerd.io/')}={v!r}" for k, v in wrong[:3])
            c.found(subject, f"gc.ref labels do not list its {len(kids)} children "
                    f"({missing} missing, {len(wrong)} wrong{shown})",
                    lambda: _rewrite_labels(store, digest, labels, fixed), how="labels rewritten")
            return
    if fixed != labels:
        what = [] if labels.get(MEDIATYPE) else ["no media type label"]
        what += [f"label {k}={labels[k]!r} is not a digest" for k in bad_refs]
        c.found(subject, "; ".join(what), lambda: _rewrite_labels(store, digest, labels, fixed), how="labels rewritten")


def _rewrite_labels(store: LocalStore, digest: str, old: dict[str, str], new: dict[str, str]) -> None:
    """Make the blob's labels exactly ``new``: in its xattrs, or a sidecar where they do not fit."""
    sidecar = maintenance.sidecar_path(store, digest)
    path = layout.blob(store.root, digest)
    if sidecar.exists():
        maintenance.write_sidecar(store, digest, new)
        return
    try:
        for k in set(old) - set(new):
            os.removexattr(path, XATTR_PREFIX + k)
        for k, v in new.items():
            if old.get(k) != v:
                os.setxattr(path, XATTR_PREFIX + k, v.encode())
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.E2BIG, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            raise
        maintenance.write_sidecar(store, digest, new)  # the store reads a sidecar before any xattr


def _check_ingest(c: _Checker, ingest: maintenance.Ingest, open_files) -> None:
    store = c.store
    use = maintenance.ingest_use(store, ingest, open_files, grace=60.0)
    if use.held:
        return
    subject = f"ingest {ingest.ref}"
    state = ingest.state
    problem = None
    if state is None:
        problem = "no readable state file"
    elif ingest.digest is None or not isinstance(state.get("size"), int):
        problem = "state file names no digest or size"
    elif state.get("ref") not in (None, ingest.ref):
        problem = f"state file is for {state.get('ref')}"
    else:
        try:
            data = (ingest.path / layout.INGEST_DATA).stat().st_size
            if data > state["size"]:
                problem = f"data holds {data} bytes, more than the blob's {state['size']}"
        except OSError:
            pass
    if problem:
        c.found(subject, problem, lambda: maintenance.remove_ingest(store, ingest))
    else:
        c.found(subject, f"stale ({use.why}, {human(ingest.disk_bytes)}); imagefs gc sweeps or keeps it", problem=False)


def report(result: FsckResult, out=sys.stdout) -> None:
    for f in result.findings:
        tail = f" ({f.repaired})" if f.repaired else ""
        kind = "" if f.problem else "warning: " if f.warning else "note: "
        print(f"fsck: {kind}{f.subject}: {f.message}{tail}", file=out)
    checked = (f"checked {result.blobs} blobs ({human(result.bytes)}), {result.ingests} ingests, "
               f"{result.tags} tags")
    problems = result.problems
    if not problems:
        warned = len(result.warnings)
        print(f"fsck: {checked}: clean" + (f" ({warned} warning{'s' if warned > 1 else ''})" if warned else ""), file=out)
    elif result.repair:
        failed = [f for f in problems if not f.repaired.startswith(("removed", "labels"))]
        state = "repaired" if not failed else f"{len(problems) - len(failed)} repaired, {len(failed)} not"
        print(f"fsck: {checked}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found, {state}", file=out)
    else:
        print(f"fsck: {checked}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found, not repaired "
              "(imagefs fsck --repair removes them)", file=out)


def run(args) -> int:
    root = args.cache_dir or default_cache_dir()
    if not root.is_dir():
        raise NotFound(f"no cache at {root}")
    result = check(LocalStore(root), repair=args.repair)
    report(result)
    return EXIT_PROBLEMS if result.problems else EXIT_CLEAN
