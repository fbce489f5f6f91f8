"""``imagefs copy SRC DEST``: the other half of containerd's ``remotes/handlers.go`` (``PushHandler``).

The graph is walked as a mount walks it (:class:`imagefs.image.Image`: the root resolved, or the
remembered tag when the registry is down; manifests committed to the cache with their gc labels),
every platform unless ``--platform`` picks one, whose manifest DEST then names. What is written is
byte-identical, so every digest is preserved.

Order, as the seed's push: blobs first (configs, layers, plain artifacts), each once, a few at a
time; then manifests, each after everything it references; the root last, by DEST's tag — a copy
that fails never leaves a tag on a partial image. Per blob the destination is asked, cheapest
first: present already (``HEAD``: *skipped*), mountable from SRC's repository on the same registry
(*mounted*), else *uploaded*. The bytes of an upload come from the cache when it holds the blob
committed (so a copy needs no SRC at all for what a mount or pull already fetched), else from SRC,
streamed and teed into the cache's ingest: a cut upload resumes from what the ingest holds, the
last chunk is handed over only once the whole blob hashed right, and the cache keeps the blob
(:mod:`.copysource`).

DEST is a registry reference (:class:`imagefs.registry.push.Pusher`) or ``oci:DIR[:TAG]``
(:class:`imagefs.ocilayout.OciLayout`); both answer the small :class:`Destination` protocol.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator, Callable, Protocol

import trio

from .cli.verbs import one_line, run_verb
from .content import maintenance
from .content.local import LocalStore
from .copysource import BlobSource, CommittedBlob
from .descriptors import (CONFIG_TYPES, LAYER_TYPES, MAX_MANIFEST_SIZE, OCI_INDEX, OCI_MANIFEST, SHA256_RE, Descriptor,
                          Platform, children, has_children, is_index)
from .errors import ConfigError, DigestMismatch, PlatformNotFound, StorageError
from .handlers import GC_REF, Fetcher, dispatch, fetch
from .image import Image, resolve_root
from .ocilayout import OciLayout, parse_destination
from .progress import PlainProgress, Progress, RichProgress
from .reference import Reference, parse
from .units import human

log = logging.getLogger(__name__)

#: Blob transfers at once; manifests are small and go up a level at a time.
CONCURRENCY = 4


class Destination(Protocol):
    """What a copy writes to: a registry repository (the pusher) or an OCI layout."""

    async def blob_exists(self, desc: Descriptor) -> bool: ...

    async def mount_blob(self, desc: Descriptor, from_repo: str) -> bool: ...

    async def upload_blob(self, desc: Descriptor,
                          open_source: Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]],
                          progress=None, file: CommittedBlob | None = None, verified: bool = False) -> None: ...

    async def manifest_exists(self, desc: Descriptor) -> bool: ...

    async def put_manifest(self, obj: str, data: bytes, media_type: str) -> str: ...

    def statistics(self): ...


# -- the plan: what to write, in which order ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Manifest:
    desc: Descriptor
    media_type: str  # what it is PUT as (an artifact in an index may be an image manifest)
    data: bytes


@dataclasses.dataclass
class Plan:
    top: Descriptor  # what DEST names
    blobs: dict[str, Descriptor] = dataclasses.field(default_factory=dict)
    levels: dict[int, dict[str, Manifest]] = dataclasses.field(default_factory=dict)  # height -> manifests


async def make_plan(image: Image, store: LocalStore, fetcher: Fetcher, top: Descriptor) -> Plan:
    """Everything reachable from ``top``; a manifest's height is one more than its tallest child's."""
    plan = Plan(top)
    heights: dict[str, int] = {}

    async def visit(desc: Descriptor) -> int:
        if desc.digest in heights:
            return heights[desc.digest]
        if desc.digest in plan.blobs:
            return 0
        found = await _manifest_of(image, store, fetcher, desc)
        if found is None:
            plan.blobs[desc.digest] = desc
            return 0
        media_type, kids, data = found
        height = 1 + max([await visit(k) for k in kids], default=0)
        heights[desc.digest] = height
        plan.levels.setdefault(height, {})[desc.digest] = Manifest(desc, media_type, data)
        return height

    await visit(top)
    return plan


async def _manifest_of(image: Image, store: LocalStore, fetcher: Fetcher,
                       desc: Descriptor) -> tuple[str, list[Descriptor], bytes] | None:
    """(media type to PUT, children, bytes) when ``desc`` is stored as a manifest; None for a blob.

    An index entry of an unknown type (an SBOM, a signature) is often an image manifest with an
    ``artifactType``: a registry only accepts an index whose entries are manifests, so it goes
    up as one, after its own children.
    """
    if has_children(desc):
        kids = await image.expand(desc)
        return desc.media_type, kids, await trio.to_thread.run_sync(store.read, desc.digest)
    if desc.media_type in LAYER_TYPES or desc.media_type in CONFIG_TYPES or desc.size > MAX_MANIFEST_SIZE:
        return None
    await fetch(store, fetcher, desc)
    data = await trio.to_thread.run_sync(store.read, desc.digest)
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "schemaVersion" not in doc or not ("layers" in doc or "manifests" in doc):
        return None
    media_type = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else (
        OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    kids = children(Descriptor(media_type, desc.digest, desc.size), data)
    labels = {f"{GC_REF}{i}": k.digest for i, k in enumerate(kids)}
    if kids and any(store.labels(desc.digest).get(k) != v for k, v in labels.items()):
        try:  # so gc keeps the artifact's own children while the image is kept
            store.update_labels(desc.digest, labels)
        except OSError as exc:
            log.debug("%s: cannot label: %s", desc.ref_key, exc)
    return media_type, kids, data


# -- the copy -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CopyResult:
    source: str
    destination: str
    digest: str
    uploaded: tuple[Descriptor, ...]
    mounted: tuple[Descriptor, ...]
    skipped: tuple[Descriptor, ...]
    manifests_put: int
    manifests_present: int
    from_source: int  # bytes read from SRC's registry for blobs
    from_cache: int
    seconds: float


async def copy(store: LocalStore, client, src_text: str, dest: Destination, *, dest_object: str | None,
               mount_from: str | None, platform: Platform | None, progress: Progress,
               dest_name: str = "", soci=None) -> CopyResult:
    """Copy ``src_text``'s graph (one platform's with ``platform``) to ``dest``; tag it ``dest_object``
    last (a digest, or None: the root goes up by digest). With ``soci`` (:class:`SociOptions`) the
    tag goes on the SOCI-enabled image :mod:`.sociconvert` writes after the copy."""
    started = time.monotonic()
    src = parse(src_text)
    root = await resolve_root(store, client, src)
    image = Image(store, client, root, platform=platform, all_platforms=platform is None)
    await image.open()
    top = root
    if platform is not None and is_index(root):
        if not image.selected:
            raise PlatformNotFound(f"{src_text} has no image for platform {platform}")
        top = image.selected[0]
    if dest_object is not None and SHA256_RE.match(dest_object) and dest_object != top.digest:
        raise ConfigError(f"DEST names {dest_object}, but {src_text} is {top.digest}")
    plan = await make_plan(image, store, client, top)
    outcomes: dict[str, list[Descriptor]] = {"uploaded": [], "mounted": [], "skipped": []}
    sources: list[BlobSource] = []

    async def one_blob(desc: Descriptor) -> list[Descriptor]:
        progress.planned(desc)
        try:
            if await dest.blob_exists(desc):
                outcome = "skipped"
            elif mount_from is not None and await dest.mount_blob(desc, mount_from):
                outcome = "mounted"
            else:
                source = BlobSource(store, client, desc, lambda n: progress.advance(desc, n))
                sources.append(source)
                await source.upload_to(dest)
                outcome = "uploaded"
        except trio.Cancelled:  # a sibling failed: its line says why
            raise
        except BaseException:
            progress.done(desc, "failed")
            raise
        outcomes[outcome].append(desc)
        progress.done(desc, outcome)
        return []

    await dispatch(one_blob, plan.blobs.values(), limit=CONCURRENCY)
    put = present = 0
    for height in sorted(plan.levels):
        level = list(plan.levels[height].values())

        async def one_manifest(m: Manifest) -> None:
            nonlocal put, present
            is_top = m.desc.digest == top.digest
            obj = (dest_object or top.digest) if is_top and soci is None else m.desc.digest
            if SHA256_RE.match(obj) and await dest.manifest_exists(m.desc):
                present += 1
                progress.done(m.desc, "skipped")
                return
            written = await dest.put_manifest(obj, m.data, m.media_type)
            if written and written != m.desc.digest:
                raise DigestMismatch(f"{m.desc.ref_key}: the destination stored it as {written}")
            put += 1
            progress.done(m.desc, "uploaded")

        async with trio.open_nursery() as nursery:
            for m in level:
                if m.desc.digest != top.digest:
                    nursery.start_soon(one_manifest, m)
        if top.digest in plan.levels[height]:  # the tag goes last
            await one_manifest(plan.levels[height][top.digest])
    written = top.digest
    if soci is not None:
        from .sociconvert import Converter

        written = (await Converter(store, client, dest, image, soci).publish(top, dest_object)).digest
    maintenance.touch(store, [*plan.blobs, *(d for lvl in plan.levels.values() for d in lvl)])
    return CopyResult(str(src), dest_name or str(dest), written, tuple(outcomes["uploaded"]), tuple(outcomes["mounted"]),
                      tuple(outcomes["skipped"]), put, present, sum(s.from_source for s in sources),
                      sum(s.from_cache for s in sources), time.monotonic() - started)


def summary(r: CopyResult) -> str:
    def part(name: str, descs: tuple[Descriptor, ...]) -> str:
        return f"{name} {len(descs)} ({human(sum(d.size for d in descs))})"

    return (f"copied {r.source} -> {r.destination} ({r.digest}): "
            f"{part('uploaded', r.uploaded)}, {part('mounted', r.mounted)}, {part('skipped', r.skipped)} blobs; "
            f"{r.manifests_put} manifests put, {r.manifests_present} present; "
            f"read {human(r.from_source)} from the source, {human(r.from_cache)} from the cache; {r.seconds:.1f}s")


# -- the verb -------------------------------------------------------------------------------------


def open_destination(text: str, opts: dict) -> tuple[Destination, str | None, Reference | None]:
    """DEST as a destination, the object its root goes up as, and its reference (a registry's)."""
    layout = parse_destination(text)
    if layout is not None:
        path, tag = layout
        return OciLayout(path), tag, None
    from .registry.connect import pusher

    ref = parse(text)
    return pusher(ref, **opts), ref.tag or ref.digest, ref


def run(args) -> int:
    """``imagefs copy SRC DEST``; exit 0 once DEST holds the image under its name."""
    from .cli.parser import registry_options
    from .content.layout import default_cache_dir
    from .registry.connect import registry_client

    opts = registry_options(args, getattr(args, "password", None))
    store = LocalStore((args.cache_dir or default_cache_dir()).resolve())
    src = parse(args.src)
    dest, dest_object, dest_ref = open_destination(args.dest, opts)
    soci = None
    if getattr(args, "soci", False):
        from .sociconvert import SPAN_SIZE, MIN_LAYER_SIZE, SociOptions

        if dest_object is not None and SHA256_RE.match(dest_object):
            raise ConfigError(f"--soci writes a new image, whose digest is not known yet: DEST {args.dest} must name a tag")
        soci = SociOptions(args.soci_span_size or SPAN_SIZE, args.soci_min_layer_size
                           if args.soci_min_layer_size is not None else MIN_LAYER_SIZE)
    mount_from = src.repository if dest_ref is not None and dest_ref.registry == src.registry \
        and dest_ref.repository != src.repository else None
    tty = sys.stdout.isatty() and not getattr(args, "plain", False)
    progress: Progress = RichProgress() if tty else PlainProgress()

    async def main() -> CopyResult:
        async with registry_client(src, **opts) as client, dest:
            return await copy(store, client, args.src, dest, dest_object=dest_object, mount_from=mount_from,
                              platform=args.platform, progress=progress, dest_name=args.dest, soci=soci)

    try:
        result = run_verb(main)
    except OSError as exc:
        raise StorageError(f"copy {args.src}: {one_line(exc)}") from exc
    finally:
        progress.close()
    print(summary(result))
    print(result.digest)
    return 0
