"""``imagefs copy --soci``: a SOCI-enabled image (SOCI index manifest v2), as ``soci convert`` writes it.

Runs after the plain copy has put every blob and manifest at DEST (the original root by digest,
untagged). For each image manifest of the copy:

- a zTOC per gzip layer of at least ``min_layer_size`` bytes, built from the committed blob (the
  cache; fetched whole and verified first if the copy did not bring it), pushed as a blob;
- the SOCI index: an OCI image manifest whose config media type is the v2 artifact type (config
  ``{}``), the zTOCs as its layers, annotated with the layer each indexes;
- the image manifest again, as an OCI manifest annotated ``com.amazon.soci.index-digest``, with
  the same config and layer blobs.

Then an image index holding each pair — the source index with the annotated manifests in place
and the SOCI indexes appended, or a new index for a single manifest — goes up last, under DEST's
tag: a failed conversion never leaves the tag on part of it. Its digest is the copy's result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import trio

from .content.store import Store
from .descriptors import (CONFIG_TYPES, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN_GZIP, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP,
                          OCI_LAYER_NONDIST_GZIP, OCI_MANIFEST, SOCI_BUILD_TOOL, SOCI_INDEX_DIGEST, SOCI_INDEX_V2,
                          SOCI_LAYER_DIGEST, SOCI_LAYER_MEDIA_TYPE, SOCI_MANIFEST_DIGEST, SOCI_SPAN_SIZE, SOCI_ZTOC,
                          Descriptor, Platform, is_index, is_manifest, is_soci_index)
from .errors import EmptyIndex, NotFound, RegistryError
from .handlers import Fetcher, dispatch, fetch
from .layers import gzindex, spans, ztoc
from .units import human

log = logging.getLogger(__name__)

GZIP_LAYERS = frozenset({DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN_GZIP, OCI_LAYER_GZIP, OCI_LAYER_NONDIST_GZIP})
BUILD_TOOL = "imagefs"
EMPTY_CONFIG = b"{}"
#: compressed bytes a span holding more than one member may have (:mod:`.layers.spans`: chosen by
#: measurement, soci's default is 4 MiB for every span); layers under 10 MiB get no zTOC (soci's).
SPAN_SIZE = spans.DENSE
MIN_LAYER_SIZE = 10 << 20


@dataclass(frozen=True)
class SociOptions:
    span_size: int = SPAN_SIZE
    min_layer_size: int = MIN_LAYER_SIZE


def _json(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data), **extra}


def _platform_json(p: Platform) -> dict:
    out = {"architecture": p.architecture, "os": p.os}
    if p.variant:
        out["variant"] = p.variant
    return out


class Converter:
    """One ``copy --soci``: zTOCs built once per layer (layers shared by platforms), two at a time."""

    def __init__(self, store: Store, fetcher: Fetcher, dest, image, opts: SociOptions, out=sys.stderr) -> None:
        self.store, self.fetcher, self.dest, self.image, self.opts, self.out = store, fetcher, dest, image, opts, out
        self._ztocs: dict[str, dict | None] = {}  # layer digest -> the zTOC's descriptor JSON (None: none built)
        self._limit = trio.CapacityLimiter(2)

    async def publish(self, top: Descriptor, dest_object: str | None) -> Descriptor:
        """Write the SOCI-enabled image of ``top`` (already copied); tag it ``dest_object`` last."""
        await self._put_blob(SOCI_INDEX_V2, EMPTY_CONFIG)
        if is_index(top):
            doc = json.loads(await trio.to_thread.run_sync(self.store.read, top.digest))
            entries = [e for e in doc.get("manifests") or [] if isinstance(e, dict)]
            kids = await self.image.expand(top)
            pairs = []
            for i, kid in enumerate(kids):
                if is_manifest(kid) and not is_soci_index(kid) and kid.platform is not None:
                    pair = await self._convert(kid, kid.platform)
                    if pair is not None:
                        entries[i] = pair[0]
                        pairs.append(pair[1])
            entries = [e for e in entries if e.get("artifactType") != SOCI_INDEX_V2
                       or not any(_same_platform(e, p) for p in pairs)] + pairs
            doc = {**doc, "mediaType": OCI_INDEX, "manifests": entries}
        else:
            pair = await self._convert(top, await self._platform(top))
            doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(pair) if pair else []}
            pairs = [pair[1]] if pair else []
        if not pairs:
            raise EmptyIndex(f"no layer of {top.ref_key} is a gzip layer of at least {human(self.opts.min_layer_size)} "
                             "(--soci-min-layer-size): there is nothing to index")
        data = _json(doc)
        digest = await self.dest.put_manifest(dest_object or _descriptor(OCI_INDEX, data)["digest"], data, OCI_INDEX)
        want = _descriptor(OCI_INDEX, data)["digest"]
        if digest and digest != want:
            raise RegistryError(f"the destination stored the SOCI-enabled index as {digest}, not {want}")
        return Descriptor(OCI_INDEX, want, len(data))

    async def _platform(self, manifest: Descriptor) -> Platform:
        """A single manifest's platform, from its config, as soci does."""
        config = (await self.image.expand(manifest))[0]
        await fetch(self.store, self.fetcher, config)
        doc = json.loads(await trio.to_thread.run_sync(self.store.read, config.digest))
        found = Platform.from_json(doc) if isinstance(doc, dict) else None
        return found or Platform.host()

    async def _convert(self, manifest: Descriptor, platform: Platform) -> tuple[dict, dict] | None:
        """(the annotated manifest's index entry, the SOCI index's), or None when no layer got a zTOC."""
        kids = await self.image.expand(manifest)
        layers = kids[1:]
        await dispatch(self._one_layer, layers, limit=4)
        ztocs = [self._ztocs[layer.digest] for layer in layers if self._ztocs.get(layer.digest)]
        if not ztocs:
            print(f"{manifest.ref_key} ({platform}): no zTOC, so no SOCI index", file=self.out)
            return None
        config = _descriptor(SOCI_INDEX_V2, EMPTY_CONFIG)
        soci = _json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": ztocs,
                      "annotations": {SOCI_BUILD_TOOL: BUILD_TOOL, SOCI_SPAN_SIZE: str(self.opts.span_size)}})
        soci_desc = _descriptor(OCI_MANIFEST, soci)
        await self.dest.put_manifest(soci_desc["digest"], soci, OCI_MANIFEST)
        doc = json.loads(await trio.to_thread.run_sync(self.store.read, manifest.digest))
        doc["mediaType"] = OCI_MANIFEST
        if isinstance(doc.get("config"), dict) and doc["config"].get("mediaType") in CONFIG_TYPES:
            doc["config"] = {**doc["config"], "mediaType": OCI_CONFIG}
        doc["annotations"] = {**(doc.get("annotations") or {}), SOCI_INDEX_DIGEST: soci_desc["digest"]}
        data = _json(doc)
        image_desc = _descriptor(OCI_MANIFEST, data, platform=_platform_json(platform), annotations=doc["annotations"])
        await self.dest.put_manifest(image_desc["digest"], data, OCI_MANIFEST)
        print(f"{manifest.ref_key} ({platform}) -> SOCI index {soci_desc['digest']} ({len(ztocs)} zTOCs), "
              f"image manifest {image_desc['digest']}", file=self.out)
        soci_entry = {**soci_desc, "artifactType": SOCI_INDEX_V2, "platform": _platform_json(platform),
                      "annotations": {SOCI_MANIFEST_DIGEST: image_desc["digest"]}}
        return image_desc, soci_entry

    async def _one_layer(self, layer: Descriptor) -> list[Descriptor]:
        if layer.digest in self._ztocs:
            return []
        self._ztocs[layer.digest] = None
        if layer.media_type not in GZIP_LAYERS or layer.size < self.opts.min_layer_size:
            print(f"{layer.ref_key} ({human(layer.size)}): no zTOC ({'not gzip' if layer.media_type not in GZIP_LAYERS else 'small'})",
                  file=self.out)
            return []
        await fetch(self.store, self.fetcher, layer)  # committed: whole and verified
        path = self.store.path(layer.digest)
        if path is None:
            raise NotFound(f"{layer.ref_key} is not in the cache after fetching it")
        async with self._limit:
            z = await trio.to_thread.run_sync(gzindex.build_ztoc, str(path), self.opts.span_size, layer.ref_key)
            data = await trio.to_thread.run_sync(ztoc.encode, z)
        desc = await self._put_blob(SOCI_ZTOC, data)
        self._ztocs[layer.digest] = {**desc, "annotations": {SOCI_LAYER_MEDIA_TYPE: OCI_LAYER_GZIP,
                                                              SOCI_LAYER_DIGEST: layer.digest}}
        print(f"{layer.ref_key} ({human(layer.size)}) -> zTOC {desc['digest']}: {len(z.span_digests)} spans, "
              f"{human(len(data))} ({100 * len(data) / layer.size:.1f} %)", file=self.out)
        return []

    async def _put_blob(self, media_type: str, data: bytes) -> dict:
        doc = _descriptor(media_type, data)
        desc = Descriptor(media_type, doc["digest"], doc["size"])
        if not await self.dest.blob_exists(desc):
            await self.dest.upload_blob(desc, _source(data))
        return doc


def _same_platform(entry: dict, other: dict) -> bool:
    return Platform.from_json(entry.get("platform")) == Platform.from_json(other.get("platform"))


def _source(data: bytes):
    """``open_source(offset)`` for bytes in memory (a zTOC is small next to its layer)."""

    @asynccontextmanager
    async def open_source(offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            if offset < len(data):
                yield data[offset:]

        yield chunks()

    return open_source
