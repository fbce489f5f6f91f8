"""Descriptors, media types, ref keys and manifest decoding.

A :class:`Descriptor` is the OCI triple (media type, digest, size) plus what a parent index says
about it (platform, annotations, urls). :func:`ref_key` names it as containerd's ``MakeRefKey``
does; that name is the directory name in a mount and the key of the store's writer locks.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DigestMismatch, InvalidManifest, UnsupportedMediaType

# Docker
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# OCI
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
CONFIG_TYPES = frozenset({DOCKER_CONFIG, OCI_CONFIG})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
LAYER_TYPES = frozenset(
    {
        DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN, DOCKER_LAYER_FOREIGN_GZIP,
        OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
        OCI_LAYER_NONDIST, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD,
    }
)
# SOCI (awslabs/soci-snapshotter): remote zTOC indexes for plain gzip layers (DESIGN §6).
SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"  # artifactType of an unbound referrer
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"  # artifactType of one bound by a SOCI-enabled image
SOCI_ZTOC = "application/octet-stream"  # a zTOC layer of a SOCI index
SOCI_INDEX_DIGEST = "com.amazon.soci.index-digest"  # on a v2 image manifest: its SOCI index
SOCI_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"  # on a v2 SOCI index descriptor: its image
SOCI_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"  # on a zTOC: the layer it indexes
SOCI_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
SOCI_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
SOCI_SPAN_SIZE = "com.amazon.soci.span-size"

# What we ask a registry to answer with when resolving a reference.
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

# Manifests are small; anything larger is hostile or broken, and is never buffered.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")  # the only digests the store holds


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``os/arch[/variant]`` as ``docker --platform`` takes it."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(parts[0].lower(), _normalize_arch(parts[1].lower()), parts[2].lower() if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> "Platform":
        """This machine's platform, named as registries name it."""
        return cls("linux", _normalize_arch(_platform.machine().lower()))

    @classmethod
    def from_json(cls, obj: Any) -> "Platform | None":
        if not isinstance(obj, dict) or not isinstance(obj.get("os"), str) or not isinstance(obj.get("architecture"), str):
            return None
        variant = obj.get("variant") if isinstance(obj.get("variant"), str) else ""
        return cls(obj["os"], obj["architecture"], variant)

    def matches(self, other: "Platform") -> bool:
        """Whether an image for ``other`` runs here; a requested variant must match (arm64 is v8)."""
        if self.os != other.os or self.architecture != _normalize_arch(other.architecture):
            return False
        if not self.variant:
            return True
        default = "v8" if self.architecture == "arm64" else ""
        return (other.variant or default) == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _normalize_arch(arch: str) -> str:
    return {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "i386": "386"}.get(arch, arch)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor; immutable, so it can key dicts and cross tasks freely."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def ref_key(self) -> str:
        return ref_key(self)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str = "descriptor") -> "Descriptor":
        """Validate a descriptor from a manifest; hostile values become :class:`InvalidManifest`."""
        if not isinstance(obj, dict):
            raise InvalidManifest(f"{where}: not a JSON object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidManifest(f"{where}: missing mediaType")
        if not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise InvalidManifest(f"{where}: digest {digest!r} is not sha256:<64 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > 1 << 50:
            raise InvalidManifest(f"{where}: invalid size {size!r}")
        urls = obj.get("urls") or ()
        annotations = obj.get("annotations") or {}
        return cls(
            media_type,
            digest,
            size,
            Platform.from_json(obj.get("platform")),
            tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
            tuple(sorted((str(k), str(v)) for k, v in annotations.items())) if isinstance(annotations, dict) else (),
        )


def ref_key(desc: Descriptor) -> str:
    """containerd's ``MakeRefKey``: a kind prefix by media type, then the digest as written."""
    mt = desc.media_type
    if mt in MANIFEST_TYPES:
        kind = "manifest"
    elif mt in INDEX_TYPES:
        kind = "index"
    elif mt in LAYER_TYPES:
        kind = "layer"
    elif mt in CONFIG_TYPES:
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


def is_manifest(desc: Descriptor) -> bool:
    return desc.media_type in MANIFEST_TYPES


def is_index(desc: Descriptor) -> bool:
    return desc.media_type in INDEX_TYPES


def has_children(desc: Descriptor) -> bool:
    return desc.media_type in MANIFEST_TYPES or desc.media_type in INDEX_TYPES


def annotation(desc: Descriptor, key: str) -> str | None:
    return next((v for k, v in desc.annotations if k == key), None)


def is_soci_index(desc: Descriptor) -> bool:
    """A SOCI index in an image index: metadata for its image, never an image to select itself."""
    return annotation(desc, SOCI_MANIFEST_DIGEST) is not None


def check_supported(media_type: str) -> None:
    """Refuse Docker schema1 as containerd does, naming the type so the user knows why."""
    if media_type in SCHEMA1_TYPES:
        raise UnsupportedMediaType(
            f"{media_type} not supported: Docker schema1 manifests are deprecated; "
            "re-push the image with a current client (schema2 or OCI)"
        )


def children(desc: Descriptor, data: bytes) -> list[Descriptor]:
    """The children of a manifest (config, then layers) or an index (manifests, in order)."""
    check_supported(desc.media_type)
    if not has_children(desc):
        return []
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidManifest(f"{desc.ref_key}: invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidManifest(f"{desc.ref_key}: not a JSON object")
    declared = doc.get("mediaType")
    if isinstance(declared, str):
        check_supported(declared)
        if declared != desc.media_type and declared in (MANIFEST_TYPES | INDEX_TYPES):
            raise InvalidManifest(f"{desc.ref_key}: body says mediaType {declared}, descriptor says {desc.media_type}")
    if is_index(desc):
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise InvalidManifest(f"{desc.ref_key}: index has no manifests list")
        return [Descriptor.from_json(m, f"{desc.ref_key} manifests[{i}]") for i, m in enumerate(manifests)]
    config = doc.get("config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest(f"{desc.ref_key}: manifest has no layers list")
    return [Descriptor.from_json(config, f"{desc.ref_key} config")] + [
        Descriptor.from_json(layer, f"{desc.ref_key} layers[{i}]") for i, layer in enumerate(layers)
    ]


def sniff_media_type(data: bytes, content_type: str | None) -> str:
    """The media type of a manifest body: the registry's ``Content-Type``, else the body's own field."""
    ct = (content_type or "").split(";")[0].strip()
    if ct and ct not in ("application/json", "application/octet-stream", "text/plain"):
        return ct
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidManifest(f"manifest is not JSON: {exc}") from exc
    if isinstance(doc, dict):
        if isinstance(doc.get("mediaType"), str):
            return doc["mediaType"]
        if doc.get("schemaVersion") == 1:
            return DOCKER_SCHEMA1
        if "manifests" in doc:
            return OCI_INDEX
        if "layers" in doc:
            return OCI_MANIFEST
    raise InvalidManifest("cannot tell the manifest's media type")


def verify(desc: Descriptor, data: bytes) -> None:
    """Raise :class:`DigestMismatch` unless ``data`` is exactly ``desc``'s bytes."""
    if len(data) != desc.size:
        raise DigestMismatch(f"{desc.ref_key}: got {len(data)} bytes, descriptor says {desc.size}")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != desc.digest:
        raise DigestMismatch(f"{desc.ref_key}: content has digest {actual}, expected {desc.digest}")
