"""Build container images in memory, byte-exact and deterministic (:mod:`.push` puts them in a registry).

Why not let docker, buildah or skopeo make test images: they recompress layers and
re-serialise manifests, so a test could never say which bytes a registry serves.
Here every byte comes from fixed inputs (sorted PAX tar entries with uid/gid 0 and
a fixed mtime, gzip with mtime 0, JSON in a fixed key order), so the same call
gives the same digests on every run, and :func:`.push.push` puts exactly those bytes into
a registry through its HTTP API.

Typical use::

    base = tar_layer({"etc/hostname": b"box\\n", "bin/sh": FileEntry.symlink("busybox")})
    img = image([base, random_layer(4 << 20, seed=1)])
    digest = push("127.0.0.1:5000", "test/app", index([img, artifact()]))  # from imagefs.testing.push
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: Media types a registry stores under /manifests/ rather than /blobs/.
MANIFEST_TYPES = frozenset({
    OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_SCHEMA1_SIGNED,
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
})

#: Every tar entry's mtime and every "created" field: 2024-01-01T00:00:00Z.
EPOCH = 1704067200
CREATED = "2024-01-01T00:00:00Z"
DEFAULT_PLATFORM: Mapping[str, str] = {"os": "linux", "architecture": "amd64"}
OPAQUE_WHITEOUT = ".wh..wh..opq"

Media = Literal["oci", "docker"]
Compression = Literal["gzip", "none", "zstd"]
Platform = Mapping[str, Any]

_LAYER_TYPES = {
    ("oci", "none"): OCI_LAYER,
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "zstd"): OCI_LAYER_ZSTD,
    ("docker", "none"): DOCKER_LAYER,
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
}


def digest_of(data: bytes) -> str:
    """The content address of ``data``, as registries and manifests spell it."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(doc: Any) -> bytes:
    # Indented on purpose: anything downstream that re-serialises a manifest
    # (instead of serving the registry's bytes) changes its digest visibly.
    return json.dumps(doc, indent=2).encode()


@dataclass(frozen=True)
class Blob:
    """Some bytes with a media type: a layer, a config, a manifest, an artifact.

    ``refs`` are blobs this one points at that are not otherwise reachable (an
    artifact manifest's empty config); they are pushed before it.
    """

    media_type: str
    data: bytes = field(repr=False)
    refs: tuple[Blob, ...] = field(default=(), repr=False)
    annotations: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # on its descriptor (eStargz's TOC digest)

    @cached_property
    def digest(self) -> str:
        return digest_of(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """An OCI descriptor for this blob; ``None``-valued extras are left out."""
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            desc["annotations"] = dict(self.annotations)
        desc.update((k, v) for k, v in extra.items() if v is not None)
        return desc

    def json(self) -> Any:
        return json.loads(self.data)

    def __repr__(self) -> str:
        return f"Blob({self.media_type!r}, {self.digest[:19]}, size={self.size})"


#: The OCI "empty" blob ``{}``: the config of a manifest that describes no image.
EMPTY_JSON = Blob(OCI_EMPTY, b"{}")


@dataclass
class Image:
    """One image manifest and everything under it."""

    manifest: Blob
    config: Blob
    layers: list[Blob]
    platform: dict[str, Any] | None = None

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def blobs(self) -> dict[str, Blob]:
        """digest -> blob for the config, the layers and the manifest itself."""
        found = {b.digest: b for b in (self.config, *self.layers)}
        found[self.manifest.digest] = self.manifest
        return found


@dataclass
class Index:
    """An OCI index or Docker manifest list, and everything under it.

    Children are images, nested indexes, or bare blobs (artifacts, or manifests
    built by hand).
    """

    index: Blob
    children: list[Image | Index | Blob]

    @property
    def manifest(self) -> Blob:
        """Same as ``index``: lets code treat Image and Index alike."""
        return self.index

    @property
    def digest(self) -> str:
        return self.index.digest

    @property
    def blobs(self) -> dict[str, Blob]:
        """digest -> blob for everything reachable, each once."""
        found: dict[str, Blob] = {}
        for child in self.children:
            found.update(_blobs_of(child))
        found[self.index.digest] = self.index
        return found


def _blobs_of(node: Image | Index | Blob) -> dict[str, Blob]:
    if isinstance(node, Blob):
        found: dict[str, Blob] = {}
        for ref in node.refs:
            found.update(_blobs_of(ref))
        found[node.digest] = node
        return found
    return node.blobs


# --------------------------------------------------------------------- layers


@dataclass(frozen=True)
class FileEntry:
    """One tar entry. In a ``files`` dict, plain ``bytes`` means a 0644 file;
    use this for directories, links, other modes or owners. ``target`` is a
    symlink's target as written, or a hard link's path inside the layer."""

    kind: Literal["file", "dir", "symlink", "hardlink"] = "file"
    data: bytes = b""
    mode: int | None = None  # default: 0644 file, 0755 dir, 0777 symlink
    target: str = ""
    uid: int = 0
    gid: int = 0

    @classmethod
    def file(cls, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> FileEntry:
        return cls("file", data, mode, uid=uid, gid=gid)

    @classmethod
    def dir(cls, mode: int = 0o755, uid: int = 0, gid: int = 0) -> FileEntry:
        return cls("dir", mode=mode, uid=uid, gid=gid)

    @classmethod
    def symlink(cls, target: str) -> FileEntry:
        return cls("symlink", target=target)

    @classmethod
    def hardlink(cls, target: str) -> FileEntry:
        return cls("hardlink", target=target)


_TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
              "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}
_DEFAULT_MODES = {"file": 0o644, "dir": 0o755, "symlink": 0o777, "hardlink": 0o644}


def _clean(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad path in layer: {path!r}")
    return "/".join(parts)


def whiteout(path: str) -> str:
    """The tar path that deletes ``path`` from lower layers (``a/b`` -> ``a/.wh.b``)."""
    head, _, name = _clean(path).rpartition("/")
    return f"{head}/.wh.{name}" if head else f".wh.{name}"


def tar_bytes(files: Mapping[str, bytes | FileEntry]) -> bytes:
    """An uncompressed, reproducible PAX tar of ``files``.

    Paths lose any leading ``/`` or ``./``; missing parent directories are added
    (0755); entries are sorted so parents precede children.
    """
    entries = {_clean(p): v if isinstance(v, FileEntry) else FileEntry.file(v) for p, v in files.items()}
    for path in list(entries):
        parent = path.rpartition("/")[0]
        while parent and parent not in entries:
            entries[parent] = FileEntry.dir()
            parent = parent.rpartition("/")[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            entry = entries[path]
            info = tarfile.TarInfo(path)
            info.type = _TAR_TYPES[entry.kind]
            info.mode = _DEFAULT_MODES[entry.kind] if entry.mode is None else entry.mode
            info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, entry.uid, entry.gid, "", ""
            if entry.kind == "symlink":
                info.linkname = entry.target
            elif entry.kind == "hardlink":
                info.linkname = _clean(entry.target)
            data = entry.data if entry.kind == "file" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    """Compress reproducibly: gzip with mtime 0 and no file name; zstd needs the
    optional ``zstandard`` package."""
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        try:
            import zstandard
        except ImportError as exc:
            raise RuntimeError("zstd layers need the optional 'zstandard' package") from exc
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


def uncompressed(blob: Blob | bytes) -> bytes:
    """A layer's tar bytes, whatever it was compressed with (told by magic bytes)."""
    data = blob.data if isinstance(blob, Blob) else blob
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        # every frame: a zstd:chunked layer is many (skippable ones included)
        return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(data)
    return data


def diff_id(layer: Blob) -> str:
    """The digest of the uncompressed tar: what an image config's rootfs lists."""
    return digest_of(uncompressed(layer))


def tar_layer(files: Mapping[str, bytes | FileEntry], *, compression: Compression = "gzip",
              media: Media = "oci") -> Blob:
    """A layer blob holding ``files`` (see :func:`tar_bytes`)."""
    try:
        media_type = _LAYER_TYPES[(media, compression)]
    except KeyError:
        raise ValueError(f"no {media} media type for {compression} layers") from None
    return Blob(media_type, compress(tar_bytes(files), compression))


def random_bytes(size: int, seed: int) -> bytes:
    """Incompressible, seeded, reproducible bytes (what :func:`random_layer` stores)."""
    rng = random.Random(seed)
    piece = 64 << 20  # randbytes cannot make 256 MiB or more at once
    if size <= piece:
        return rng.randbytes(size)
    return b"".join(rng.randbytes(min(piece, size - i)) for i in range(0, size, piece))


def random_layer(size: int, seed: int, *, path: str = "data/random.bin",
                 compression: Compression = "gzip", media: Media = "oci") -> Blob:
    """A layer with one file of ``size`` pseudo-random bytes: big blobs that do not
    shrink under compression, for range-request and lazy-read tests."""
    return tar_layer({path: random_bytes(size, seed)}, compression=compression, media=media)


# ------------------------------------------------------------------ manifests


def image(layers: list[Blob], *, media: Media = "oci", platform: Platform | None = DEFAULT_PLATFORM,
          config_extra: Mapping[str, Any] | None = None,
          annotations: Mapping[str, str] | None = None) -> Image:
    """An image: a real config (platform, rootfs.diff_ids, history) and a schema 2
    manifest. ``platform=None`` leaves the image out of index platform matching
    (its config still says linux/amd64); ``config_extra`` overrides top-level
    config keys."""
    plat = dict(platform) if platform is not None else None
    source = plat or DEFAULT_PLATFORM
    config_doc: dict[str, Any] = {
        "created": CREATED,
        "architecture": source["architecture"],
        "os": source["os"],
        **{k: source[k] for k in ("variant", "os.version", "os.features") if k in source},
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id(layer) for layer in layers]},
        "history": [{"created": CREATED, "created_by": f"imagefs.testing layer {i}"}
                    for i in range(len(layers))],
    }
    config_doc.update(config_extra or {})
    oci = media == "oci"
    config = Blob(OCI_CONFIG if oci else DOCKER_CONFIG, _json(config_doc))
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return Image(Blob(doc["mediaType"], _json(doc)), config, list(layers), plat)


def index(children: list[Image | Index | Blob], *, media: Media = "oci",
          platforms: list[Platform | None] | None = None,
          annotations: Mapping[str, str] | None = None) -> Index:
    """An OCI index (or Docker manifest list) over ``children``, in order.

    Each entry's platform is ``platforms[i]`` when given, else the Image's own
    platform; Blob and Index children get none unless given.
    """
    if platforms is not None and len(platforms) != len(children):
        raise ValueError("platforms must have one entry per child")
    entries = []
    for i, child in enumerate(children):
        if platforms is not None:
            plat = platforms[i]
        else:
            plat = child.platform if isinstance(child, Image) else None
        blob = child if isinstance(child, Blob) else child.manifest
        entries.append(blob.descriptor(platform=dict(plat) if plat is not None else None))
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX if media == "oci" else DOCKER_MANIFEST_LIST,
        "manifests": entries,
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return Index(Blob(doc["mediaType"], _json(doc)), list(children))


def artifact(media_type: str = "application/vnd.example.sbom.v1+json",
             data: bytes | None = None) -> Blob:
    """A descriptor of a media type no image reader knows, to put in an index.

    By default its bytes are an OCI 1.1-style artifact manifest (``artifactType``,
    the empty config, no layers) that points at nothing real: a registry only
    accepts an index whose entries exist as manifests, and distribution 2.8 only
    accepts manifests it can parse, so the bytes are an image manifest while the
    index entry says ``media_type``. Pass ``data`` to get a plain blob instead.
    """
    if data is not None:
        return Blob(media_type, data)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": media_type,
        "config": EMPTY_JSON.descriptor(),
        "layers": [],
        "annotations": {"org.opencontainers.image.title": "imagefs test artifact"},
    }
    return Blob(media_type, _json(doc), refs=(EMPTY_JSON,))
