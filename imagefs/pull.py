"""``imagefs pull REF`` fetches an image into the cache.

It walks the graph as a mount does — :class:`imagefs.image.Image` resolves the root and picks
the platform(s), :func:`imagefs.handlers.fetch` commits each blob with its gc labels — so a pull
leaves exactly what a mount would fetch, and a mount afterwards needs no registry. A pull fetches
the root, the selected platform's manifests, their configs and layers, and the index's entries
that name no platform (signatures, SBOMs), as ``ctr content fetch`` does. Progress is shown by
:mod:`imagefs.progress`; ``imagefs inspect`` (:mod:`imagefs.inspect`) shows the graph instead.

Each layer is inflated once in a worker thread (as soon as it is committed, so inflating overlaps
the fetches still running) and compared with the ``rootfs.diff_ids`` of its config (:mod:`imagefs.layers.diffids`): a mismatch is a warning line,
not a failure. The result is kept as the blob's ``containerd.io/uncompressed`` label, so pulling
again (or after a mount indexed the layer) inflates nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time

import trio

from .cli.verbs import cache_dir, client_for, one_line, quiet_logging, run_verb
from .content import maintenance
from .content.labels import UNCOMPRESSED
from .content.local import LocalStore
from .descriptors import LAYER_TYPES, Descriptor, Platform, has_children, is_index, is_manifest
from .errors import ImagefsError, StorageError
from .handlers import dispatch, fetch
from .image import Image, resolve_root
from .layers import diffids
from .progress import PlainProgress, Progress, ProgressFetcher, RichProgress
from .reference import parse
from .units import human

log = logging.getLogger(__name__)


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


def run(args) -> int:
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
