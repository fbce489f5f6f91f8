"""Remote indexes (DESIGN §6): a gzip layer's zTOC from the registry, so first contact lists it
without fetching the layer.

Where a zTOC comes from, most trusted first:

- **v2, a SOCI-enabled image.** The image index holding the selected manifest also holds its SOCI
  index (annotated ``com.amazon.soci.image-manifest-digest``); both are bound by digest to the
  root, so the zTOCs are trusted as the image is.
- **v1, a referrer** of the manifest: the OCI referrers API, else the ``sha256-<hex>`` referrers
  tag. Anyone who can push may add or drop one, so it is used unless ``--no-remote-index``, and
  the log says which index and from where.

``--strict`` uses neither. A zTOC is fetched whole and committed by its digest, decoded, checked
against the layer, and turned into the :class:`LayerIndex` a local pass would have built — rows,
spans ``(start, sha256, end)`` and checkpoints in the form ``indexed_gzip`` imports — so every read
after that is the local gzip path, each span checked against the zTOC's digest. That index is
persisted like a local one: a remount lists with no request. Anything wrong refuses the layer's
remote index in one log line, and the caller indexes it locally.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass

import trio

from ..content.store import Store
from ..descriptors import (SOCI_INDEX_DIGEST, SOCI_INDEX_V1, SOCI_INDEX_V2, SOCI_LAYER_DIGEST, SOCI_MANIFEST_DIGEST,
                           Descriptor, annotation, children, is_manifest, is_soci_index)
from ..errors import ImagefsError, InvalidManifest, NotFound
from ..handlers import Fetcher, fetch
from . import ztoc
from .entries import GZIP, LayerIndex

log = logging.getLogger(__name__)

#: A zTOC larger than this is refused (one of a 10 GiB layer at 4 MiB spans is about 80 MiB).
MAX_ZTOC = 256 << 20


@dataclass
class RemoteStatistics:
    indexes: int = 0  # SOCI indexes found
    ztocs: int = 0  # zTOCs fetched and used
    ztoc_bytes: int = 0
    refused: int = 0  # zTOCs (or indexes) found wrong: those layers were indexed locally


@dataclass(frozen=True)
class Found:
    """A SOCI index of one manifest: its zTOCs by layer digest, and where it came from."""

    index: Descriptor | None
    where: str
    ztocs: dict[str, Descriptor]


NONE = Found(None, "", {})


class RemoteIndexes:
    """zTOCs for the layers of one image. ``referrers`` is the registry client (``referrers``,
    ``resolve``, ``fetch_manifest``); ``v1=False`` refuses unbound referrers."""

    def __init__(self, image, store: Store, fetcher: Fetcher, referrers, *, v1: bool = True) -> None:
        self.image, self.store, self.fetcher, self.client, self.v1 = image, store, fetcher, referrers, v1
        self.stats = RemoteStatistics()
        self._found: dict[str, Found] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def index(self, layer: Descriptor) -> LayerIndex | None:
        """The layer's index from a remote zTOC, or None (no zTOC, or a wrong one: logged)."""
        for manifest in self._manifests_with(layer):
            found = await self._soci(manifest)
            desc = found.ztocs.get(layer.digest)
            if desc is None:
                continue
            try:
                built = await self._convert(layer, desc)
            except (ImagefsError, OSError) as exc:
                self.stats.refused += 1
                log.warning("%s: the zTOC %s from %s is refused (%s); indexing the layer locally",
                            layer.ref_key, desc.digest, found.where, exc)
                return None
            self.stats.ztocs += 1
            self.stats.ztoc_bytes += desc.size
            log.info("%s: listed from zTOC %s (%s): %d entries, %d spans", layer.ref_key, desc.digest, found.where,
                     len(built.entries), len(built.spans))
            return built
        return None

    def _manifests_with(self, layer: Descriptor) -> list[Descriptor]:
        image = self.image
        return [image.descriptors[key] for key, kids in list(image.children.items())
                if is_manifest(image.descriptors[key]) and any(k.digest == layer.digest for k in kids[1:])]

    async def _soci(self, manifest: Descriptor) -> Found:
        found = self._found.get(manifest.digest)
        if found is not None:
            return found
        async with self._locks.setdefault(manifest.digest, trio.Lock()):
            if manifest.digest not in self._found:
                try:
                    found = await self._bound(manifest) or (await self._referrer(manifest) if self.v1 else None)
                except (ImagefsError, OSError) as exc:
                    self.stats.refused += 1
                    log.warning("%s: no remote index used: %s", manifest.ref_key, exc)
                    found = None
                self._found[manifest.digest] = found or NONE
        return self._found[manifest.digest]

    async def _bound(self, manifest: Descriptor) -> Found | None:
        """v2: the SOCI index next to ``manifest`` in an image index of this image."""
        image = self.image
        for key, kids in list(image.children.items()):
            if not any(k.digest == manifest.digest for k in kids):
                continue
            for kid in kids:
                if is_soci_index(kid) and annotation(kid, SOCI_MANIFEST_DIGEST) == manifest.digest:
                    body = json.loads(await trio.to_thread.run_sync(self.store.read, manifest.digest))
                    named = (body.get("annotations") or {}).get(SOCI_INDEX_DIGEST) if isinstance(body, dict) else None
                    if named is not None and named != kid.digest:
                        raise InvalidManifest(f"the manifest names SOCI index {named}, the index {kid.digest}")
                    return await self._ztocs(kid, SOCI_INDEX_V2, f"SOCI index v2 {kid.digest}, bound by {key}", None)
        return None

    async def _referrer(self, manifest: Descriptor) -> Found | None:
        """v1: the referrers API, else the referrers tag; the newest SOCI index listed."""
        data = await self.client.referrers(manifest.digest, SOCI_INDEX_V1)
        where = "the referrers API"
        if data is None:
            tag = "sha256-" + manifest.hex
            try:
                desc = await self.client.resolve(tag)
                data = await self.client.fetch_manifest(desc)
            except NotFound:
                return None
            where = f"the referrers tag {tag}"
        try:
            listed = json.loads(data).get("manifests") or []
            candidates = [(m.get("annotations") or {}, Descriptor.from_json(m, where)) for m in listed
                          if isinstance(m, dict) and m.get("artifactType") == SOCI_INDEX_V1]
        except (ValueError, AttributeError) as exc:
            raise InvalidManifest(f"{where}: not an image index: {exc}") from exc
        if not candidates:
            return None
        candidates.sort(key=lambda c: str(c[0].get("org.opencontainers.image.created", "")))
        soci = candidates[-1][1]
        return await self._ztocs(soci, SOCI_INDEX_V1, f"SOCI index v1 {soci.digest}, from {where}", manifest)

    async def _ztocs(self, soci: Descriptor, kind: str, where: str, subject: Descriptor | None) -> Found:
        await fetch(self.store, self.fetcher, soci)  # verified by its digest, kept with gc labels
        data = await trio.to_thread.run_sync(self.store.read, soci.digest)
        body = json.loads(data)
        config = body.get("config") if isinstance(body, dict) else None
        if not isinstance(config, dict) or config.get("mediaType") != kind and body.get("artifactType") != kind:
            raise InvalidManifest(f"{where}: not a {kind} (config {config.get('mediaType') if isinstance(config, dict) else None})")
        if subject is not None:
            named = (body.get("subject") or {}).get("digest")
            if named is not None and named != subject.digest:
                raise InvalidManifest(f"{where}: its subject is {named}, not {subject.digest}")
        kids = children(Descriptor(soci.media_type, soci.digest, soci.size), data)[1:]
        ztocs = {layer: k for k in kids if (layer := annotation(k, SOCI_LAYER_DIGEST)) is not None}
        self.stats.indexes += 1
        log.info("using %s: zTOCs for %d layers", where, len(ztocs))
        return Found(soci, where, ztocs)

    async def _convert(self, layer: Descriptor, desc: Descriptor) -> LayerIndex:
        if desc.size > MAX_ZTOC:
            raise ztoc.InvalidZtoc(f"{desc.size} bytes, over the {MAX_ZTOC} byte limit")
        await fetch(self.store, self.fetcher, desc)
        data = await trio.to_thread.run_sync(self.store.read, desc.digest)
        return await trio.to_thread.run_sync(convert, data, layer)


def convert(data: bytes, layer: Descriptor) -> LayerIndex:
    """A decoded, checked zTOC as the index a local pass builds (blocking: run it in a thread)."""
    z = ztoc.decode(data, layer.ref_key)
    if z.compressed_size != layer.size:
        raise ztoc.InvalidZtoc(f"it indexes {z.compressed_size} compressed bytes, the layer has {layer.size}")
    entries, skipped = ztoc.to_entries(z, layer.ref_key)
    return LayerIndex(layer.digest, GZIP, entries, z.uncompressed_size, ztoc.index_spans(z),
                      zlib.compress(ztoc.to_gzidx(z), 1), skipped, "")  # level 1: on the first look's path
