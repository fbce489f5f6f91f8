"""``oci:DIR[:TAG]``: an OCI image layout as a copy's destination.

It answers the same calls as the registry pusher (:class:`imagefs.registry.push.Pusher`), so
:mod:`imagefs.copy` walks one way whatever it writes to::

    DIR/oci-layout                 {"imageLayoutVersion": "1.0.0"}
    DIR/index.json                 the roots; TAG is org.opencontainers.image.ref.name
    DIR/blobs/sha256/<hex>         every blob and manifest, by digest

Nothing half-written is ever visible under its final name: a blob streams into a temporary file
beside its place, is hashed on the way, and is renamed only once size and digest match; index.json
is rewritten whole and renamed over the old one, under an ``flock`` so two copies into one layout
do not lose each other's tags. A blob already present with the right size is skipped. A full disk
leaves the temporary file removed and says so in one line.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import trio

from .descriptors import OCI_INDEX, SHA256_RE, Descriptor
from .errors import DigestMismatch, ImagefsError, InvalidReference, LayoutError, StorageError
from .units import human

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
DEFAULT_TAG = "latest"

OpenSource = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]


@dataclass(frozen=True)
class LayoutStatistics:
    """The pusher's counters, as far as a directory has them (no requests, mounts or resumes)."""

    requests: int = 0
    bytes_uploaded: int = 0
    blobs_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_skipped: int = 0
    resumes: int = 0


def parse_destination(text: str) -> tuple[Path, str] | None:
    """``oci:DIR[:TAG]`` -> (DIR, TAG); None for anything else (a registry reference).

    A colon followed by no ``/`` ends DIR, as skopeo reads it; no TAG means ``latest``, as a
    registry reference without a tag does.
    """
    if not text.startswith("oci:"):
        return None
    rest = text[len("oci:"):]
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag:
        path, tag = rest, DEFAULT_TAG
    if not path:
        raise InvalidReference(f"{text}: oci: needs a directory (oci:DIR[:TAG])")
    if not tag:
        raise InvalidReference(f"{text}: empty tag after the last ':'")
    return Path(path), tag


class OciLayout:
    """Writes one image into an OCI layout directory, created if missing."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self._uploaded = 0
        self._bytes = 0
        self._skipped = 0

    async def __aenter__(self) -> "OciLayout":
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            layout = self.root / "oci-layout"
            if not layout.exists():
                _atomic_write(layout, LAYOUT_VERSION)
        except OSError as exc:
            raise self._os_error(exc, "oci-layout") from exc
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        pass

    def __str__(self) -> str:
        return f"oci:{self.root}"

    # -- blobs ------------------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        if not SHA256_RE.match(digest):
            raise LayoutError(f"{digest}: an OCI layout here holds sha256 blobs only")
        return self.blobs / digest.split(":", 1)[1]

    async def blob_exists(self, desc: Descriptor) -> bool:
        try:
            present = self._path(desc.digest).stat().st_size == desc.size
        except FileNotFoundError:
            return False
        if present:
            self._skipped += 1
        return present

    async def mount_blob(self, desc: Descriptor, from_repo: str) -> bool:
        return False  # a directory has no other repository to mount from

    async def upload_blob(self, desc: Descriptor, open_source: OpenSource, progress=None, file=None,
                          verified: bool = False) -> None:
        """Stream the blob into a temporary file, hashing it; rename only if it matches. ``file`` (a
        committed cache file) is not used: ``open_source`` reads it just as well; the hash is kept
        even for a ``verified`` source, as it rides on the write's thread trip anyway."""
        target = self._path(desc.digest)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        hasher = hashlib.sha256()
        written = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                async with open_source(0) as stream:
                    async for chunk in stream:
                        if written + len(chunk) > desc.size:
                            raise DigestMismatch(f"{desc.ref_key}: source sent more than the {desc.size} bytes "
                                                 "the descriptor says")
                        await trio.to_thread.run_sync(_write_and_hash, fd, chunk, hasher)
                        written += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
                actual = "sha256:" + hasher.hexdigest()
                if written != desc.size or actual != desc.digest:
                    raise DigestMismatch(f"{desc.ref_key}: source sent {written} bytes with digest {actual}; "
                                         f"expected {desc.size} bytes, {desc.digest}")
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o444)
            os.rename(tmp, target)
        except OSError as exc:
            raise self._os_error(exc, f"{desc.ref_key} ({human(desc.size)})") from exc
        finally:
            tmp.unlink(missing_ok=True)
        self._uploaded += 1
        self._bytes += written

    # -- manifests --------------------------------------------------------------------------

    async def manifest_exists(self, desc: Descriptor) -> bool:
        return await self.blob_exists(desc)

    async def put_manifest(self, obj: str, data: bytes, media_type: str) -> str:
        """Write the manifest as a blob; ``obj`` a tag also names it in index.json. Returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if SHA256_RE.match(obj) and obj != digest:
            raise DigestMismatch(f"manifest {obj}: its bytes have digest {digest}")
        desc = Descriptor(media_type, digest, len(data))
        try:
            target = self._path(digest)
            if not (target.exists() and target.stat().st_size == len(data)):
                await trio.to_thread.run_sync(_atomic_write, target, data, 0o444)
            if not SHA256_RE.match(obj):
                await trio.to_thread.run_sync(self._name, desc, obj)
        except OSError as exc:
            raise self._os_error(exc, f"manifest {obj}") from exc
        return digest

    def _name(self, desc: Descriptor, tag: str) -> None:
        """Point ``tag`` at ``desc`` in index.json, replacing what it named before."""
        with open(self.root / "oci-layout", "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            path = self.root / "index.json"
            try:
                doc = json.loads(path.read_bytes())
            except FileNotFoundError:
                doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            except ValueError as exc:
                raise LayoutError(f"{path}: not JSON ({exc}); not overwriting it") from exc
            if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
                raise LayoutError(f"{path}: not an OCI index; not overwriting it")
            entry = {**desc.to_json(), "annotations": {REF_NAME: tag}}
            doc["manifests"] = [m for m in doc["manifests"]
                                if not (isinstance(m, dict) and (m.get("annotations") or {}).get(REF_NAME) == tag)]
            doc["manifests"].append(entry)
            _atomic_write(path, json.dumps(doc, indent=2).encode() + b"\n")

    def statistics(self) -> LayoutStatistics:
        return LayoutStatistics(bytes_uploaded=self._bytes, blobs_uploaded=self._uploaded, blobs_skipped=self._skipped)

    def _os_error(self, exc: OSError, what: str) -> ImagefsError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(f"no space left on the device of {self.root} writing {what}; "
                                "nothing half-written was left: free space and run the copy again")
        return StorageError(f"{self.root}: cannot write {what}: {exc.strerror or exc}")


def _write_and_hash(fd: int, data: bytes, hasher) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    hasher.update(data)


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a temporary file beside ``path``, fsync it and rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
