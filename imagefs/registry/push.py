"""Writing to a registry: the other half of the seed's handlers (containerd's ``PushHandler``).

A :class:`Pusher` writes to one repository of one registry — the registry itself, since mirrors
serve pulls only. It answers the questions a copy asks of each descriptor, in the seed's order:
is the blob there already (``HEAD``, the seed's *AlreadyExists*), can the registry mount it from
another repository of the same host (``POST ?mount=&from=``), and otherwise uploads it.

An upload is ``POST``, then ``PATCH`` segments of :attr:`Pusher.chunk_size` bytes, each streamed
from the source (never a whole blob in memory), then ``PUT ?digest=``. A segment that fails —
cut, timed out, 5xx — is not sent again from the start: the upload URL is asked where it stands
(``GET`` → ``Range: 0-N``) and the source is reopened there. The final ``PUT`` is sent only once
the bytes hashed to the digest, so a corrupt source never becomes a blob; the registry checks
again. Who hashes: a local file (a committed cache blob) is hashed by a worker thread while
``sendfile`` sends it; a source that verifies itself (the copy's) is not hashed twice; any other
is hashed here as it goes. To resume at an offset the registry reports, that hasher is kept as it
was at the start of the segment in flight (``hashlib``'s ``copy()``): the source is reopened
there and the bytes up to the registry's offset are hashed without being sent.

``PATCH`` bodies go on a plain socket in worker threads (:mod:`.sendbody`) with the headers
httpx's ``POST`` carried; requests, retries, auth and errors are :mod:`.pushhttp`'s. A refusal is
one line: ``access denied to NAME (anonymous): push``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Protocol

import httpx
import trio

from ..descriptors import ACCEPT_MANIFESTS, Descriptor
from ..errors import DigestMismatch, ImagefsError, NotFound, RegistryError, Unauthorized
from ..reference import Reference
from .auth import Credentials
from .hosts import uses_plain_http
from .pushhttp import PushHttp
from .retry import FETCH, Retrier, RetryPolicy
from .sendbody import ChunkReader, file_pieces, hash_file

__all__ = ["Pusher", "PushStatistics", "LocalFile", "CHUNK_SIZE"]

log = logging.getLogger(__name__)

#: Bytes per PATCH: what a cut upload may have to send again, and the requests a blob costs.
CHUNK_SIZE = 32 << 20

OpenSource = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]


class LocalFile(Protocol):
    """A blob whose bytes are a local file (committed in the cache): sent from ``path`` directly,
    with ``read(n)`` told of every ``n`` bytes sent."""

    path: Path

    def read(self, n: int) -> None: ...


class _Rerouted(Exception):
    """The socket route was refused (401/403: a token that expired); httpx takes the upload over."""


@dataclass(frozen=True)
class PushStatistics:
    requests: int
    bytes_uploaded: int
    blobs_uploaded: int
    blobs_mounted: int
    blobs_skipped: int
    resumes: int


class _Upload:
    """One upload session: where the next bytes go, how many the registry holds (``offset``), and
    ``mark``: the hasher as it was at a byte at or before ``offset``, the start of the last segment."""

    def __init__(self, location: str, offset: int = 0, mark: tuple | None = None) -> None:
        self.location = location
        self.offset = offset
        self.mark = mark if mark is not None and mark[1] <= offset else (hashlib.sha256(), 0)


class Pusher:
    """Writes blobs and manifests to ``ref``'s repository. Nothing touches the network until asked."""

    def __init__(
        self,
        ref: Reference,
        *,
        plain_http: bool = False,
        insecure: bool = False,
        ca_file: str | None = None,
        cert_dir: str | None = None,
        credentials: Credentials | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy = FETCH,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.ref = ref
        scheme = "http" if uses_plain_http(ref.host, plain_http) else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        self._h = PushHttp(ref, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, credentials=credentials,
                           timeout=timeout, transport=transport, retry=retry)
        self.timeout = timeout
        self.retry = retry
        self.chunk_size = chunk_size
        self._bytes = self._uploaded = self._mounted = self._skipped = self._resumes = 0

    def __str__(self) -> str:
        return self.ref.name

    async def aclose(self) -> None:
        await self._h.aclose()

    async def __aenter__(self) -> "Pusher":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def statistics(self) -> PushStatistics:
        return PushStatistics(self._h.requests, self._bytes, self._uploaded, self._mounted, self._skipped, self._resumes)

    # -- what is there already -------------------------------------------------------------------

    async def blob_exists(self, desc: Descriptor) -> bool:
        """The blob is there with the right size: nothing to send (the seed's *AlreadyExists*)."""
        return await self._exists(f"{self.base}/blobs/{desc.digest}", desc, f"blob {desc.digest}")

    async def manifest_exists(self, desc: Descriptor) -> bool:
        return await self._exists(f"{self.base}/manifests/{desc.digest}", desc, f"manifest {desc.digest}",
                                  headers={"Accept": f"{desc.media_type}, {ACCEPT_MANIFESTS}"})

    async def _exists(self, url: str, desc: Descriptor, what: str, headers: dict[str, str] | None = None) -> bool:
        resp = await self._h.request("HEAD", url, what=what, headers=headers)
        await resp.aclose()
        if resp.status_code == 404:
            return False
        if resp.status_code != 200:
            raise await self._h.status_error(resp, what)
        found = resp.headers.get("content-length")
        there = found is None or not found.isdigit() or int(found) == desc.size
        if there and "blobs/" in url:
            self._skipped += 1
        return there

    # -- blobs -------------------------------------------------------------------------------------

    async def mount_blob(self, desc: Descriptor, from_repo: str) -> bool:
        """Ask the registry to link the blob from ``from_repo`` on the same host: no byte is sent.

        A registry that cannot (the blob is not there, or it does not mount) opens an upload
        instead (202); that upload is cancelled and False returned, so the caller uploads.
        """
        what = f"mount of {desc.digest} from {from_repo}"
        resp = await self._h.request("POST", f"{self.base}/blobs/uploads/", what=what,
                                     params={"mount": desc.digest, "from": from_repo})
        await resp.aclose()
        if resp.status_code == 201:
            self._mounted += 1
            return True
        if resp.status_code == 202:
            await self._h.cancel(self._h.location(resp))
            return False
        raise await self._h.status_error(resp, what)

    async def upload_blob(self, desc: Descriptor, open_source: OpenSource,
                          progress: Callable[[int], None] | None = None, file: LocalFile | None = None,
                          verified: bool = False) -> None:
        """Send ``desc``'s bytes, from ``open_source(offset)``, resuming where the registry has them.

        With ``file`` (the blob is a local file) the bytes go from it with ``sendfile`` while a worker
        thread hashes it; ``open_source`` is not called. ``verified`` says that every stream
        ``open_source`` gives raises before its last byte unless the whole blob hashed to
        ``desc.digest`` (the copy's sources do): they are not hashed here again. Either way the
        final ``PUT`` is sent only once the bytes hashed to the digest.
        """
        what = f"upload of {desc.digest}"
        retrier = Retrier(self.retry, f"{self.ref.name}: {what}")
        upload = await self._start(what)
        try:
            async with trio.open_nursery() as nursery:
                if file is not None:
                    nursery.start_soon(self._check_file, desc, file.path)
                hasher = None
                while True:
                    try:
                        if file is not None:
                            await self._send_file(desc, upload, file, retrier, progress, what)
                        else:
                            hasher = await self._send_from(desc, upload, open_source, retrier, progress, what,
                                                           verified)
                        break
                    except _Rerouted:
                        upload = await self._status(upload, what)
                    except (DigestMismatch, Unauthorized, NotFound):
                        raise
                    except ImagefsError as exc:
                        if not await retrier.wait(exc):
                            raise retrier.gave_up(exc)
                        self._resumes += 1
                        upload = await self._status(upload, what)
                        log.info("%s: %s: %s; resuming at byte %d of %d", self.ref.name, what, exc, upload.offset,
                                 desc.size)
            if hasher is not None and f"sha256:{hasher.hexdigest()}" != desc.digest:
                raise DigestMismatch(f"{desc.ref_key}: the source's bytes hash to sha256:{hasher.hexdigest()}, "
                                     f"not {desc.digest}; nothing was stored")
            await self._finish(upload, desc, what)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._h.cancel(upload.location)
            raise
        self._uploaded += 1

    async def _check_file(self, desc: Descriptor, path: Path) -> None:
        """Hash ``path`` (in parallel with sending it); a mismatch ends the upload before its ``PUT``."""
        digest, size = await trio.to_thread.run_sync(hash_file, path, desc.size)
        if size != desc.size or digest != desc.digest:
            raise DigestMismatch(f"{desc.ref_key}: {path} holds {size} bytes with digest {digest}, expected "
                                 f"{desc.size} bytes, {desc.digest}; nothing was stored (imagefs fsck --repair)")

    async def _send_file(self, desc: Descriptor, upload: _Upload, file: LocalFile, retrier: Retrier,
                         progress: Callable[[int], None] | None, what: str) -> None:
        """PATCH the rest of ``file`` from ``upload.offset``, a segment at a time."""
        def sent(n: int) -> None:
            file.read(n)
            if progress is not None:
                progress(n)

        fd = await trio.to_thread.run_sync(os.open, file.path, os.O_RDONLY)
        try:
            while upload.offset < desc.size:
                start = upload.offset
                await self._segment(upload, start, min(self.chunk_size, desc.size - start), what, fd=fd, progress=sent)
                retrier.progress()
        finally:
            os.close(fd)

    async def _send_from(self, desc: Descriptor, upload: _Upload, open_source: OpenSource, retrier: Retrier,
                         progress: Callable[[int], None] | None, what: str, verified: bool):
        """PATCH the rest of the blob from ``upload.offset``, a segment at a time; the whole blob's
        hasher (None for a verified source, which hashes itself)."""
        if verified:
            hasher, hashed = None, upload.offset
        else:
            mark, hashed = upload.mark
            hasher = mark.copy()
        async with open_source(hashed) as source:
            chunks = ChunkReader(source)
            async for data in chunks.take(upload.offset - hashed):  # held by the registry: hash, don't send
                hasher.update(data)
                hashed += len(data)
            while hashed < desc.size:
                if hasher is not None:
                    upload.mark = (hasher.copy(), hashed)
                n = min(self.chunk_size, desc.size - hashed)
                await self._segment(upload, hashed, n, what, chunks=chunks, hasher=hasher, progress=progress)
                hashed += n
                retrier.progress()
        if hashed != desc.size:
            raise RegistryError(f"{desc.ref_key}: the source ended at byte {hashed} of {desc.size}")
        return hasher

    async def _segment(self, upload: _Upload, start: int, n: int, what: str, *, chunks: "ChunkReader | None" = None,
                       fd: int | None = None, hasher=None, progress: Callable[[int], None] | None = None) -> None:
        """PATCH ``[start, start + n)`` from ``chunks`` (fed to ``hasher`` as they go) or from ``fd``;
        on success the upload stands at ``start + n``. On the socket route when httpx opened this
        upload's origin, else through httpx."""
        route = self._h.route_for(upload.location)
        if route is not None:
            resp, sent = await self._h.patch_on_socket(route, upload.location, start, n, what, chunks, fd, hasher, progress)
        else:
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                async for data in (chunks.take(n) if chunks is not None else file_pieces(fd, start, n)):
                    if hasher is not None:
                        hasher.update(data)
                    sent += len(data)
                    if progress is not None:
                        progress(len(data))
                    yield data

            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(n),
                       "Content-Range": f"{start}-{start + n - 1}"}
            resp = await self._h.once("PATCH", upload.location, what=what, headers=headers, content=body())
        await resp.aclose()
        if route is not None and resp.status_code in (401, 403):
            log.debug("%s: %s: the socket route was refused (%d); going on through httpx", self.ref.name, what,
                      resp.status_code)
            self._h.route = None
            raise _Rerouted()
        if resp.status_code != 202:
            raise await self._h.status_error(resp, what)
        if sent != n:
            raise RegistryError(f"{self.ref.name}: {what}: the source ended at byte {start + sent}")
        self._bytes += n
        upload.location, upload.offset = self._h.location(resp), start + n

    async def _start(self, what: str) -> _Upload:
        resp = await self._h.request("POST", f"{self.base}/blobs/uploads/", what=what)
        await resp.aclose()
        if resp.status_code != 202:
            raise await self._h.status_error(resp, what)
        self._h.learn_route(resp)
        return _Upload(self._h.location(resp))

    async def _status(self, upload: _Upload, what: str) -> _Upload:
        """Where the registry stands on ``upload`` (``Range: 0-N``); a fresh upload if it forgot it."""
        resp = await self._h.request("GET", upload.location, what=what)
        await resp.aclose()
        if resp.status_code == 404:
            log.info("%s: %s: the registry forgot the upload; starting again", self.ref.name, what)
            return await self._start(what)
        if resp.status_code not in (200, 204):
            raise await self._h.status_error(resp, what)
        end = resp.headers.get("range", "0-0").rpartition("-")[2]
        # distribution answers "0-0" for an empty upload as for one byte: take it as empty.
        offset = int(end) + 1 if end.isdigit() and int(end) > 0 else 0
        return _Upload(self._h.location(resp, upload.location), offset, upload.mark)

    async def _finish(self, upload: _Upload, desc: Descriptor, what: str) -> None:
        sep = "&" if "?" in upload.location else "?"
        resp = await self._h.request("PUT", f"{upload.location}{sep}digest={desc.digest}", what=what,
                                     headers={"Content-Length": "0", "Content-Type": "application/octet-stream"})
        await resp.aclose()
        if resp.status_code not in (201, 204):
            raise await self._h.status_error(resp, what)

    # -- manifests -------------------------------------------------------------------------------

    async def put_manifest(self, obj: str, data: bytes, media_type: str) -> str:
        """PUT ``data`` byte for byte as ``obj`` (a tag or a digest); the digest the registry stored."""
        what = f"manifest {obj}"
        resp = await self._h.request("PUT", f"{self.base}/manifests/{obj}", what=what, content=data,
                                     headers={"Content-Type": media_type})
        await resp.aclose()
        if resp.status_code not in (200, 201):
            raise await self._h.status_error(resp, what)
        return resp.headers.get("docker-content-digest") or f"sha256:{hashlib.sha256(data).hexdigest()}"
