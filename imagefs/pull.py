"""``imagefs pull REF`` fetches an image into the cache; ``imagefs inspect REF`` shows its graph.

Both walk the graph as a mount does — :class:`imagefs.image.Image` resolves the root and picks
the platform(s), :func:`imagefs.handlers.fetch` commits each blob with its gc labels — so a pull
leaves exactly what a mount would fetch, and a mount afterwards needs no registry. A pull fetches
the root, the selected platform's manifests, their configs and layers, and the index's entries
that name no platform (signatures, SBOMs), as ``ctr content fetch`` does.

On a terminal, a progress bar per blob and one for the total (rich); otherwise one plain line per
blob — ``fetched layer-sha256:… 3.0 MiB`` or ``exists config-sha256:… 1.4 KiB`` — and a total,
so logs and CI output stay readable.

Each layer is inflated once in a worker thread (as soon as it is committed, so inflating overlaps
the fetches still running) and compared with the ``rootfs.diff_ids`` of its config (:mod:`imagefs.layers.diffids`): a mismatch is a warning line,
not a failure. The result is kept as the blob's ``containerd.io/uncompressed`` label, so pulling
again (or after a mount indexed the layer) inflates nothing.

``inspect`` fetches only manifests and indexes (a mount's cost: the root and the selected
platform's manifests; ``--all-platforms`` for every one), never a config or layer. It reads what
the cache already holds and writes nothing to it but the tag's resolution.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Protocol

import trio

from .cli.verbs import cache_dir, client_for, one_line, quiet_logging, run_verb
from .content import maintenance
from .content.labels import UNCOMPRESSED
from .content.local import LocalStore
from .descriptors import LAYER_TYPES, Descriptor, Platform, has_children, is_index, is_manifest
from .errors import ImagefsError, StorageError
from .handlers import Fetcher, dispatch, fetch
from .image import Image, resolve_root
from .layers import diffids
from .reference import parse
from .units import human

log = logging.getLogger(__name__)


# -- progress --------------------------------------------------------------------------------------


#: Outcomes of a blob that moved no bytes through us: cached already, present at the destination, or
#: mounted there from another repository (``imagefs copy``).
WITHOUT_BYTES = frozenset({"exists", "skipped", "mounted"})


class Progress(Protocol):
    def planned(self, desc: Descriptor) -> None:
        """``desc`` will be fetched or found: it counts in the total."""

    def advance(self, desc: Descriptor, nbytes: int) -> None:
        """``nbytes`` more of ``desc`` arrived."""

    def done(self, desc: Descriptor, outcome: str) -> None:
        """``desc`` is ``fetched``, ``exists`` (was cached) or ``failed``; for a copy ``uploaded``,
        ``skipped`` (present at the destination) or ``mounted`` (from another repository)."""

    def close(self) -> None: ...


class PlainProgress:
    """One line per finished blob, for logs and pipes."""

    def __init__(self, out=sys.stdout) -> None:
        self.out = out

    def planned(self, desc: Descriptor) -> None:
        pass

    def advance(self, desc: Descriptor, nbytes: int) -> None:
        pass

    def done(self, desc: Descriptor, outcome: str) -> None:
        print(f"{outcome:<7} {desc.ref_key} {human(desc.size)}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A bar per blob in flight and one for the total; finished blobs scroll above as lines."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.console = Console()
        self.bars = Progress(
            TextColumn("{task.description}", style="bold"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.total = self.bars.add_task("total", total=0)
        self.tasks: dict[str, int] = {}
        self.known: set[str] = set()
        self.bars.start()

    def planned(self, desc: Descriptor) -> None:
        if desc.digest not in self.known:
            self.known.add(desc.digest)
            self.bars.update(self.total, total=(self.bars.tasks[self.total].total or 0) + desc.size)

    def advance(self, desc: Descriptor, nbytes: int) -> None:
        self.planned(desc)
        task = self.tasks.get(desc.digest)
        if task is None:
            name = desc.ref_key.split(":", 1)[0] + ":" + desc.hex[:12]
            task = self.tasks[desc.digest] = self.bars.add_task(name, total=desc.size)
        self.bars.advance(task, nbytes)
        self.bars.advance(self.total, nbytes)

    def done(self, desc: Descriptor, outcome: str) -> None:
        self.planned(desc)
        task = self.tasks.pop(desc.digest, None)
        if task is not None:
            self.bars.remove_task(task)
        if outcome in WITHOUT_BYTES:
            self.bars.advance(self.total, desc.size)
        style = {"fetched": "green", "uploaded": "green", "mounted": "cyan", "failed": "red"}.get(
            outcome, "dim" if outcome in WITHOUT_BYTES else "")
        self.bars.console.print(f"[{style}]{outcome:<7}[/] {desc.ref_key} {human(desc.size)}", highlight=False,
                                soft_wrap=True)

    def close(self) -> None:
        self.bars.stop()


class ProgressFetcher:
    """A :class:`Fetcher` that tells a :class:`Progress` of every byte it streams."""

    def __init__(self, inner: Fetcher, progress: Progress) -> None:
        self.inner, self.progress = inner, progress
        self.streamed: dict[str, int] = {}

    @asynccontextmanager
    async def open(self, desc: Descriptor, start: int = 0, end: int | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        self.streamed.setdefault(desc.digest, 0)
        async with self.inner.open(desc, start, end) as stream:
            yield self._count(desc, stream)

    async def _count(self, desc: Descriptor, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in stream:
            self.streamed[desc.digest] += len(chunk)
            self.progress.advance(desc, len(chunk))
            yield chunk


# -- pull ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PullResult:
    ref: str
    root: Descriptor
    fetched: tuple[Descriptor, ...]
    existing: tuple[Descriptor, ...]
    failed: tuple[tuple[Descriptor, str], ...]
    bytes_fetched: int
    seconds: float
    warnings: tuple[str, ...] = ()  # layers that do not inflate to their config's diff_id


def leaves(image: Image) -> list[Descriptor]:
    """What a pull fetches after :meth:`Image.open`: the selected manifests' configs and layers,
    and the entries of walked indexes that name no platform (artifacts, signatures)."""
    out: dict[str, Descriptor] = {}
    for key, kids in image.children.items():
        parent = image.descriptors[key]
        for kid in kids:
            if has_children(kid):
                continue
            if not is_index(parent) or kid.platform is None:
                out.setdefault(kid.digest, kid)
    return list(out.values())


async def pull(store: LocalStore, client, ref_text: str, *, platform: Platform, all_platforms: bool,
               progress: Progress) -> PullResult:
    started = time.monotonic()
    ref = parse(ref_text)
    root = await resolve_root(store, client, ref)
    fetcher = ProgressFetcher(client, progress)
    image = Image(store, fetcher, root, platform=platform, all_platforms=all_platforms)
    await image.open()
    fetched: list[Descriptor] = []
    existing: list[Descriptor] = []
    failed: list[tuple[Descriptor, str]] = []

    def finish(desc: Descriptor) -> None:
        outcome = "fetched" if desc.digest in fetcher.streamed else "exists"
        (fetched if outcome == "fetched" else existing).append(desc)
        progress.done(desc, outcome)

    for key in image.children:  # the root, walked indexes and selected manifests: all committed now
        finish(image.descriptors[key])
    todo = leaves(image)
    if not has_children(root):  # an artifact or a bare blob: the root is the whole graph
        todo.insert(0, root)
    for desc in todo:
        progress.planned(desc)

    uncompressed = Uncompressed(store)
    async with trio.open_nursery() as inflating:  # each layer inflates while the others still arrive

        async def handler(desc: Descriptor) -> list[Descriptor]:
            try:
                await fetch(store, fetcher, desc, root=desc.digest == root.digest)
            except (ImagefsError, OSError) as exc:
                failed.append((desc, one_line(exc)))
                progress.done(desc, "failed")
            else:
                finish(desc)
                if desc.media_type in LAYER_TYPES:
                    inflating.start_soon(uncompressed.find, desc)
            return []

        await dispatch(handler, todo)
    warnings = await check_diff_ids(store, image, str(ref), uncompressed)
    maintenance.touch(store, [d.digest for d in (*fetched, *existing)])
    return PullResult(str(ref), root, tuple(fetched), tuple(existing), tuple(failed),
                      sum(fetcher.streamed.values()), time.monotonic() - started, tuple(warnings))


INFLATE_CONCURRENCY = 2  # layers inflated at once: CPU work, on the cores a pull shares


class Uncompressed:
    """What each layer inflates to: its ``containerd.io/uncompressed`` label if it has one (set by
    an earlier pull or a mount's index pass), else one inflate of the committed blob in a worker
    thread, whose result becomes that label."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.found: dict[str, str | None] = {}  # None: not a layer that inflates (or gone)
        self._started: set[str] = set()
        self._limiter = trio.CapacityLimiter(INFLATE_CONCURRENCY)

    async def find(self, layer: Descriptor) -> None:
        if layer.digest in self._started:
            return
        self._started.add(layer.digest)
        label = maintenance.safe_labels(self.store, layer.digest).get(UNCOMPRESSED)
        if label:
            self.found[layer.digest] = label
            return
        async with self._limiter:
            self.found[layer.digest] = await trio.to_thread.run_sync(_inflate, self.store, layer.digest)


async def check_diff_ids(store: LocalStore, image: Image, name: str, uncompressed: Uncompressed) -> list[str]:
    """One warning per layer of the pulled manifests that does not inflate to its config's diff_id."""
    wanted: list[tuple[str, Descriptor, str]] = []  # (manifest ref key, layer, diff_id)
    for key, kids in image.children.items():
        if not is_manifest(image.descriptors[key]) or not kids or store.path(kids[0].digest) is None:
            continue
        listed = diffids.diff_ids(await trio.to_thread.run_sync(store.read, kids[0].digest))
        wanted += [(key, layer, diff_id) for layer, diff_id in zip(kids[1:], listed)]
    async with trio.open_nursery() as nursery:  # layers that were cached already
        for _, layer, _ in wanted:
            if store.path(layer.digest) is not None:
                nursery.start_soon(uncompressed.find, layer)
    out = []
    for key, layer, diff_id in wanted:
        actual = uncompressed.found.get(layer.digest)
        if actual is not None and actual != diff_id:
            out.append(diffids.mismatch(layer.ref_key, actual, diff_id, f"{name} ({key})"))
            log.warning("%s", out[-1])
    return out


def _inflate(store: LocalStore, digest: str) -> str | None:
    """The uncompressed digest of a committed layer (blocking), kept as its label."""
    path = store.path(digest)
    if path is None:
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            actual, uncompressed = diffids.digests(f.fileno())
    except OSError as exc:  # evicted beside us: nothing to compare
        log.debug("%s: not inflated for its diff_id: %s", digest, exc)
        return None
    if actual != digest or uncompressed is None:  # fsck's to report; nothing to compare
        return None
    try:
        store.update_labels(digest, {UNCOMPRESSED: uncompressed})
    except OSError as exc:
        log.debug("could not label %s with its uncompressed digest: %s", digest, exc)
    return uncompressed


def summary(result: PullResult) -> str:
    n = len(result.fetched) + len(result.existing)
    rate = result.bytes_fetched / result.seconds if result.seconds > 0 else 0.0
    total = sum(d.size for d in (*result.fetched, *result.existing))
    line = (f"pulled {result.ref} ({result.root.digest}): {n} blobs, {human(total)}; "
            f"fetched {len(result.fetched)} ({human(result.bytes_fetched)}), {len(result.existing)} already cached; "
            f"{result.seconds:.1f}s, {human(int(rate))}/s")
    if result.failed:
        line += f"; {len(result.failed)} FAILED"
    if result.warnings:
        line += f"; {len(result.warnings)} diff_id warning{'s' if len(result.warnings) > 1 else ''}"
    return line


def run_pull(args) -> int:
    quiet_logging(getattr(args, "debug", False))
    store = LocalStore(cache_dir(args))
    tty = sys.stdout.isatty() and not getattr(args, "plain", False)
    progress: Progress = RichProgress() if tty else PlainProgress()

    async def main() -> PullResult:
        async with client_for(args, args.ref) as client:
            return await pull(store, client, args.ref, platform=args.platform or Platform.host(),
                              all_platforms=args.all_platforms, progress=progress)

    try:
        result = run_verb(main)
    except OSError as exc:
        raise StorageError(f"pull {args.ref}: {one_line(exc)}") from exc
    finally:
        progress.close()
    for desc, err in result.failed:
        print(f"imagefs: {desc.ref_key}: {err}", file=sys.stderr)
    print(summary(result))
    return 1 if result.failed else 0


# -- inspect ---------------------------------------------------------------------------------------


class CacheFirst:
    """A fetcher that serves what the cache holds and asks the registry for the rest."""

    def __init__(self, store: LocalStore, inner: Fetcher) -> None:
        self.store, self.inner = store, inner

    @asynccontextmanager
    async def open(self, desc: Descriptor, start: int = 0, end: int | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        path = self.store.path(desc.digest)
        if path is None:
            async with self.inner.open(desc, start, end) as stream:
                yield stream
            return
        data = await trio.to_thread.run_sync(path.read_bytes)  # manifests only: small

        async def one() -> AsyncIterator[bytes]:
            yield data[start:end]

        yield one()


async def inspect(store: LocalStore, client, ref_text: str, *, platform: Platform, all_platforms: bool) -> dict:
    """The descriptor tree of ``ref``, as JSON-ready dicts; manifests only, the cache untouched."""
    ref = parse(ref_text)
    root = await resolve_root(store, client, ref)
    with tempfile.TemporaryDirectory(prefix="imagefs-inspect-") as tmp:
        image = Image(LocalStore(Path(tmp)), CacheFirst(store, client), root,
                      platform=platform, all_platforms=all_platforms)
        await image.open()
        # Manifests the cache holds cost nothing to show: expand them too.
        for key, kids in list(image.children.items()):
            for kid in kids:
                if has_children(kid) and kid.ref_key not in image.children and store.path(kid.digest) is not None:
                    await image.expand(kid)

    def node(desc: Descriptor, platform: Platform | None) -> dict:
        out: dict = {"refKey": desc.ref_key, "mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
        if platform is not None:
            out["platform"] = {"os": platform.os, "architecture": platform.architecture,
                               **({"variant": platform.variant} if platform.variant else {})}
        if desc.ref_key in image.children:
            out["children"] = [node(k, k.platform) for k in image.children[desc.ref_key]]
        elif has_children(desc):
            out["children"] = None  # a manifest not fetched: another platform's
        return out

    return {"reference": str(ref), "root": node(root, None)}


def render_tree(doc: dict, out=sys.stdout) -> None:
    print(f"{doc['reference']} -> {doc['root']['digest']}", file=out)

    def line(n: dict) -> str:
        plat = n.get("platform")
        parts = [n["refKey"]]
        if plat:
            parts.append("/".join(p for p in (plat["os"], plat["architecture"], plat.get("variant", "")) if p))
        parts += [n["mediaType"], human(n["size"])]
        if n.get("children", []) is None:
            parts.append("(not fetched; --all-platforms shows it)")
        return "  ".join(parts)

    def walk(n: dict, prefix: str, last: bool, top: bool) -> None:
        print((prefix + ("└── " if last else "├── ") if not top else "") + line(n), file=out)
        kids = n.get("children") or []
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if top else ("    " if last else "│   ")), i == len(kids) - 1, False)

    walk(doc["root"], "", True, True)


def run_inspect(args) -> int:
    quiet_logging(getattr(args, "debug", False))
    store = LocalStore(cache_dir(args))

    async def main() -> dict:
        async with client_for(args, args.ref) as client:
            return await inspect(store, client, args.ref, platform=args.platform or Platform.host(),
                                 all_platforms=args.all_platforms)

    try:
        doc = run_verb(main)
    except OSError as exc:
        raise StorageError(f"inspect {args.ref}: {one_line(exc)}") from exc
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render_tree(doc)
    return 0
