"""The descriptor graph a mount shows, discovered as it is walked.

At mount, :meth:`Image.open` fetches the root and, for an index, the manifests of the selected
platform — concurrently, and nothing more, so a mount costs what ``docker pull`` costs in manifest
GETs. Other manifests are fetched by :meth:`Image.expand` the first time anyone looks inside
them; every descriptor found is announced to listeners (the filesystem adds a directory).
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from .content.labels import GC_ROOT, MEDIATYPE, now_rfc3339
from .content.store import Store
from .descriptors import (LAYER_TYPES, Descriptor, Platform, children, has_children, is_index, is_soci_index,
                          sniff_media_type)
from .errors import PlatformNotFound, RegistryUnreachable
from .handlers import Fetcher, dispatch, fetch
from .reference import Reference

log = logging.getLogger(__name__)


class Image:
    """One mounted image: its root, what is known of its graph, and the platform selection."""

    def __init__(
        self,
        store: Store,
        fetcher: Fetcher,
        root: Descriptor,
        *,
        platform: Platform | None = None,
        all_platforms: bool = False,
    ) -> None:
        self.store = store
        self.fetcher = fetcher
        self.root = root
        self.platform = platform or Platform.host()
        self.all_platforms = all_platforms
        self.descriptors: dict[str, Descriptor] = {}
        self.children: dict[str, list[Descriptor]] = {}
        self.platforms: dict[str, Platform] = {}
        self.selected: list[Descriptor] = []  # image manifests of the selected platform(s)
        self.listeners: list[Callable[[Descriptor], None]] = []
        self._locks: dict[str, trio.Lock] = {}
        self._add(root)

    def _add(self, desc: Descriptor) -> None:
        if desc.ref_key in self.descriptors:
            return
        self.descriptors[desc.ref_key] = desc
        for listener in self.listeners:
            listener(desc)

    async def open(self) -> None:
        """Fetch the root and the selected platform's manifests."""

        async def handler(desc: Descriptor) -> list[Descriptor]:
            kids = await self.expand(desc)
            if not is_index(desc):
                if has_children(desc):
                    self.selected.append(desc)
                return []
            return self._select(desc, kids)

        await dispatch(handler, [self.root])
        if self.store.path(self.root.digest) is not None and GC_ROOT not in self.store.labels(self.root.digest):
            # Committed earlier as someone's child: it is a root now.
            self.store.update_labels(self.root.digest, {GC_ROOT: now_rfc3339()})

    def selected_layers(self) -> list[Descriptor]:
        """The layers of the selected image manifest(s), each once, in order."""
        layers = {kid.digest: kid for man in self.selected for kid in self.children.get(man.ref_key, [])[1:]
                  if kid.media_type in LAYER_TYPES}
        return list(layers.values())

    def _select(self, index: Descriptor, kids: list[Descriptor]) -> list[Descriptor]:
        manifests = [k for k in kids if has_children(k) and not is_soci_index(k)]
        if self.all_platforms:
            return manifests
        # Nested indexes without a platform are walked; a platform picks its first match, as docker does.
        nested = [k for k in manifests if is_index(k) and k.platform is None]
        match = [k for k in manifests if k.platform is not None and self.platform.matches(k.platform)]
        if not match and not nested:
            have = sorted({str(k.platform) for k in manifests if k.platform is not None})
            if have:
                raise PlatformNotFound(
                    f"{index.ref_key} has no image for platform {self.platform}; it has: {', '.join(have)} "
                    "(use --platform or --all-platforms)"
                )
        return match[:1] + nested

    async def expand(self, desc: Descriptor) -> list[Descriptor]:
        """The children of a manifest or index, fetching it first if it is not committed."""
        if desc.ref_key in self.children:
            return self.children[desc.ref_key]
        if not has_children(desc):
            return []
        lock = self._locks.setdefault(desc.ref_key, trio.Lock())
        async with lock:  # many lookups of one directory: parse once
            if desc.ref_key not in self.children:
                await self.ensure(desc)
                data = await trio.to_thread.run_sync(self.store.read, desc.digest)
                kids = children(desc, data)
                for kid in kids:
                    if is_index(desc) and kid.platform is not None:
                        self.platforms.setdefault(kid.ref_key, kid.platform)
                    self._add(kid)
                self.children[desc.ref_key] = kids
        return self.children[desc.ref_key]

    async def ensure(self, desc: Descriptor) -> None:
        """Make a blob committed, whole and verified (manifests, configs, artifacts)."""
        if self.store.path(desc.digest) is None:
            await fetch(self.store, self.fetcher, desc, root=desc.digest == self.root.digest)


async def resolve_root(store: Store, client, ref: Reference) -> Descriptor:
    """The root descriptor for ``ref``: asked of the registry, else what the cache remembers.

    A tag's resolution is remembered so that a later mount works offline, as ``docker run``
    uses a local image; a digest whose manifest is cached needs no registry at all.
    """
    if ref.digest and store.path(ref.digest) is not None:
        data = store.read(ref.digest)
        media_type = store.labels(ref.digest).get(MEDIATYPE) or sniff_media_type(data, None)
        return Descriptor(media_type, ref.digest, len(data))
    try:
        root = await client.resolve()
    except RegistryUnreachable as exc:
        remembered = store.recall_tag(ref.name, ref.tag) if ref.tag and not ref.digest else None
        if remembered is None:
            raise
        desc, when = remembered
        root = Descriptor.from_json(desc)
        if store.path(root.digest) is None:
            raise
        log.warning("%s; using %s as resolved at %s", exc, root.digest, when)
        return root
    if ref.tag and not ref.digest:
        store.remember_tag(ref.name, ref.tag, root.to_json())
    return root

