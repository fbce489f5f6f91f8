"""Writing to a registry: the other half of the seed's handlers (containerd's ``PushHandler``).

A :class:`Pusher` writes to one repository of one registry — the registry itself, since mirrors
serve pulls only. It answers the questions a copy asks of each descriptor, in the seed's order:
is the blob there already (``HEAD``, the seed's *AlreadyExists*), can the registry mount it from
another repository of the same host (``POST ?mount=&from=``), and otherwise uploads it.

An upload is ``POST``, then ``PATCH`` segments of :attr:`Pusher.chunk_size` bytes, each streamed
from the source (never a whole blob in memory), then ``PUT ?digest=``. A segment that fails —
cut, timed out, 5xx — is not sent again from the start: the upload URL is asked where it stands
(``GET`` → ``Range: 0-N``) and the source is reopened there. The bytes are hashed as they go, and
the final ``PUT`` is sent only once they hashed to the digest, so a corrupt source never becomes
a blob; the registry checks again. To resume at an offset the registry reports, the hasher is
kept as it was at the start of the segment in flight (``hashlib``'s ``copy()``): the source is
reopened there and the bytes up to the registry's offset are hashed without being sent.

Auth is :class:`~.auth.RegistryAuth`'s: distribution's challenge for a ``POST`` names
``repository:NAME:pull,push`` (and, for a mount, ``repository:FROM:pull``), so the token asked
for carries the push scope. A refusal is one line: ``access denied to NAME (anonymous): push``.
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
from ..errors import DigestMismatch, ImagefsError, NotFound, RegistryError, RegistryUnreachable, Unauthorized
from ..reference import Reference
from .auth import Credentials, RegistryAuth
from .blobstream import reason
from .client import error_detail
from .credentials import ssl_context
from .hosts import uses_plain_http
from .retry import FETCH, RETRY_STATUSES, Retrier, RetryPolicy, parse_retry_after, retryable_transport
from .sendbody import Answered, Patch, Route, hash_file, route_of

__all__ = ["Pusher", "PushStatistics", "LocalFile", "CHUNK_SIZE"]

log = logging.getLogger(__name__)

#: Bytes per PATCH: what a cut upload may have to send again, and the requests a blob costs.
CHUNK_SIZE = 32 << 20
#: Error bodies are read for the registry's message, never more than this.
MAX_ERROR_BODY = 64 * 1024

#: Chunks of a streamed segment received ahead of the worker thread that sends them.
FEED_DEPTH = 8
#: One read of a local file sent through httpx (when no socket route is known).
FILE_READ = 1 << 20

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
        self._auth = RegistryAuth(credentials)
        self._tls = ssl_context(ca_file, insecure, cert_dir)
        # PATCH bodies go on a plain socket (sendbody) once httpx has opened the upload; a custom
        # transport (tests) keeps every byte on httpx.
        self._direct = transport is None
        self._route: Route | None = None
        self._http = httpx.AsyncClient(
            auth=self._auth,
            verify=self._tls,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
            transport=transport,
            headers={"User-Agent": "imagefs/0.1"},
        )
        self.timeout = timeout
        self.retry = retry
        self.chunk_size = chunk_size
        self._requests = self._bytes = self._uploaded = self._mounted = self._skipped = self._resumes = 0

    def __str__(self) -> str:
        return self.ref.name

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "Pusher":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def statistics(self) -> PushStatistics:
        return PushStatistics(self._requests, self._bytes, self._uploaded, self._mounted, self._skipped, self._resumes)

    # -- what is there already -------------------------------------------------------------------

    async def blob_exists(self, desc: Descriptor) -> bool:
        """The blob is there with the right size: nothing to send (the seed's *AlreadyExists*)."""
        return await self._exists(f"{self.base}/blobs/{desc.digest}", desc, f"blob {desc.digest}")

    async def manifest_exists(self, desc: Descriptor) -> bool:
        return await self._exists(f"{self.base}/manifests/{desc.digest}", desc, f"manifest {desc.digest}",
                                  headers={"Accept": f"{desc.media_type}, {ACCEPT_MANIFESTS}"})

    async def _exists(self, url: str, desc: Descriptor, what: str, headers: dict[str, str] | None = None) -> bool:
        resp = await self._send("HEAD", url, what=what, headers=headers)
        await resp.aclose()
        if resp.status_code == 404:
            return False
        if resp.status_code != 200:
            raise await self._status_error(resp, what)
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
        resp = await self._send("POST", f"{self.base}/blobs/uploads/", what=what,
                                params={"mount": desc.digest, "from": from_repo})
        await resp.aclose()
        if resp.status_code == 201:
            self._mounted += 1
            return True
        if resp.status_code == 202:
            await self._cancel(self._location(resp))
            return False
        raise await self._status_error(resp, what)

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
                await self._cancel(upload.location)
            raise
        self._uploaded += 1

    async def _check_file(self, desc: Descriptor, path: Path) -> None:
        """Hash ``path`` (in parallel with sending it); a mismatch ends the upload before its ``PUT``."""
        digest, size = await trio.to_thread.run_sync(hash_file, path, desc.size)
        if size != desc.size or digest != desc.digest:
            raise DigestMismatch(f"{desc.ref_key}: {path} holds {size} bytes that hash to {digest}, not "
                                 f"{desc.digest}; nothing was stored")

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
            chunks = _Reader(source)
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

    async def _segment(self, upload: _Upload, start: int, n: int, what: str, *, chunks: "_Reader | None" = None,
                       fd: int | None = None, hasher=None, progress: Callable[[int], None] | None = None) -> None:
        """PATCH ``[start, start + n)`` from ``chunks`` (fed to ``hasher`` as they go) or from ``fd``;
        on success the upload stands at ``start + n``. On the socket route when httpx opened this
        upload's origin, else through httpx."""
        route = self._route if self._route is not None and self._route.serves(httpx.URL(upload.location)) else None
        if route is not None:
            resp, sent = await self._socket_patch(route, upload.location, start, n, what, chunks, fd, hasher, progress)
        else:
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                async for data in (chunks.take(n) if chunks is not None else _file_pieces(fd, start, n)):
                    if hasher is not None:
                        hasher.update(data)
                    sent += len(data)
                    if progress is not None:
                        progress(len(data))
                    yield data

            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(n),
                       "Content-Range": f"{start}-{start + n - 1}"}
            resp = await self._once("PATCH", upload.location, what=what, headers=headers, content=body())
        await resp.aclose()
        if route is not None and resp.status_code in (401, 403):
            log.debug("%s: %s: the socket route was refused (%d); going on through httpx", self.ref.name, what,
                      resp.status_code)
            self._route = None
            raise _Rerouted()
        if resp.status_code != 202:
            raise await self._status_error(resp, what)
        if sent != n:
            raise RegistryError(f"{self.ref.name}: {what}: the source ended at byte {start + sent}")
        self._bytes += n
        upload.location, upload.offset = self._location(resp), start + n

    async def _socket_patch(self, route: Route, location: str, start: int, n: int, what: str, chunks, fd, hasher,
                            progress) -> tuple[httpx.Response, int]:
        """One PATCH through :class:`~.sendbody.Patch`: the registry's answer as a response, and bytes sent."""
        self._requests += 1
        url = httpx.URL(location)
        patch = Patch(route, url, start, n, self.timeout)
        try:
            async with patch:
                await patch.open()
                if fd is not None:
                    await patch.send_file(fd, start, n, progress)
                else:
                    await _feed(patch, chunks.take(n), hasher, progress)
                if patch.sent != n:
                    raise RegistryError(f"{self.ref.name}: {what}: the source ended at byte {start + patch.sent}")
                answer = await patch.answer()
        except Answered as exc:
            answer = exc.answer
        except OSError as exc:
            error = f"no answer within {self.timeout:g} s" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise RegistryError(f"registry {self.ref.host}: {what}: {error}") from exc
        resp = httpx.Response(answer.status, headers=answer.headers, content=answer.body,
                              request=httpx.Request("PATCH", url))
        if answer.status in RETRY_STATUSES:
            raise await self._status_error(resp, what)
        return resp, patch.sent

    async def _start(self, what: str) -> _Upload:
        resp = await self._send("POST", f"{self.base}/blobs/uploads/", what=what)
        await resp.aclose()
        if resp.status_code != 202:
            raise await self._status_error(resp, what)
        if self._direct:
            self._route = route_of(resp.request, self._tls)
        return _Upload(self._location(resp))

    async def _status(self, upload: _Upload, what: str) -> _Upload:
        """Where the registry stands on ``upload`` (``Range: 0-N``); a fresh upload if it forgot it."""
        resp = await self._send("GET", upload.location, what=what)
        await resp.aclose()
        if resp.status_code == 404:
            log.info("%s: %s: the registry forgot the upload; starting again", self.ref.name, what)
            return await self._start(what)
        if resp.status_code not in (200, 204):
            raise await self._status_error(resp, what)
        end = resp.headers.get("range", "0-0").rpartition("-")[2]
        # distribution answers "0-0" for an empty upload as for one byte: take it as empty.
        offset = int(end) + 1 if end.isdigit() and int(end) > 0 else 0
        return _Upload(self._location(resp, upload.location), offset, upload.mark)

    async def _finish(self, upload: _Upload, desc: Descriptor, what: str) -> None:
        sep = "&" if "?" in upload.location else "?"
        resp = await self._send("PUT", f"{upload.location}{sep}digest={desc.digest}", what=what,
                                headers={"Content-Length": "0", "Content-Type": "application/octet-stream"})
        await resp.aclose()
        if resp.status_code not in (201, 204):
            raise await self._status_error(resp, what)

    async def _cancel(self, location: str) -> None:
        """Leave no upload dangling; a registry that will not cancel expires it later anyway."""
        try:
            resp = await self._http.delete(location)
            await resp.aclose()
        except httpx.HTTPError as exc:
            log.debug("%s: cancelling an upload: %s", self.ref.name, reason(exc))

    # -- manifests -------------------------------------------------------------------------------

    async def put_manifest(self, obj: str, data: bytes, media_type: str) -> str:
        """PUT ``data`` byte for byte as ``obj`` (a tag or a digest); the digest the registry stored."""
        what = f"manifest {obj}"
        resp = await self._send("PUT", f"{self.base}/manifests/{obj}", what=what, content=data,
                                headers={"Content-Type": media_type})
        await resp.aclose()
        if resp.status_code not in (200, 201):
            raise await self._status_error(resp, what)
        return resp.headers.get("docker-content-digest") or f"sha256:{hashlib.sha256(data).hexdigest()}"

    # -- plumbing --------------------------------------------------------------------------------

    def _location(self, resp: httpx.Response, default: str | None = None) -> str:
        location = resp.headers.get("location")
        if not location:
            if default is not None:
                return default
            raise RegistryError(f"{self.ref.name}: the registry gave no upload location (HTTP {resp.status_code})")
        return str(resp.request.url.join(location))

    async def _once(self, method: str, url: str, *, what: str, headers: dict[str, str] | None = None,
                    params: dict[str, str] | None = None, content=None) -> httpx.Response:
        """One request; a failure to get an answer is our error (the caller decides on retries)."""
        self._requests += 1
        try:
            request = self._http.build_request(method, url, headers=headers, params=params, content=content)
            resp = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        except httpx.StreamError as exc:  # a body that had to be sent twice (an unexpected challenge)
            raise RegistryError(f"{self.ref.name}: {what}: {reason(exc)}") from exc
        if resp.status_code in RETRY_STATUSES:
            raise await self._status_error(resp, what)
        return resp

    async def _send(self, method: str, url: str, *, what: str, headers: dict[str, str] | None = None,
                    params: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
        """A request with no streamed body, retried for 429/5xx, resets and timeouts."""
        retrier = Retrier(self.retry, f"{self.ref.name}: {what}")
        while True:
            self._requests += 1
            try:
                resp = await self._http.request(method, url, headers=headers, params=params, content=content)
            except httpx.TransportError as exc:
                error = self._transport_error(exc)
                if retryable_transport(exc) and await retrier.wait(error):
                    continue
                raise retrier.gave_up(error) from exc
            if resp.status_code not in RETRY_STATUSES:
                return resp
            error = await self._status_error(resp, what)
            hint = parse_retry_after(resp.headers.get("retry-after")) if resp.status_code in (429, 503) else None
            if await retrier.wait(error, hint):
                continue
            raise retrier.gave_up(error)

    def _transport_error(self, exc: httpx.TransportError) -> RegistryError:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return RegistryUnreachable(f"cannot reach registry {self.ref.host}: {reason(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return RegistryUnreachable(f"registry {self.ref.host}: no answer within {self.timeout:g} s ({type(exc).__name__})")
        return RegistryError(f"registry {self.ref.host}: {reason(exc)}")

    async def _status_error(self, resp: httpx.Response, what: str) -> ImagefsError:
        """The error an unwanted answer means, with the registry's own message when it sent one."""
        body = bytearray()
        try:
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
        except (httpx.TransportError, httpx.DecodingError, httpx.StreamError):
            pass
        finally:
            await resp.aclose()
        detail = error_detail(httpx.Response(resp.status_code, content=bytes(body)))
        code = resp.status_code
        if code in (401, 403):
            return Unauthorized(f"access denied to {self.ref.name} ({self._auth.identity}): push{detail}")
        if code == 404:
            return NotFound(f"{self.ref.name}: {what}: not found{detail}")
        if code in (502, 503, 504):
            return RegistryUnreachable(f"registry {self.ref.host} unavailable: {what}: answered {code}{detail}")
        return RegistryError(f"{self.ref.name}: {what}: registry answered {code}{detail}")


class _Reader:
    """A source's chunks re-cut to exact lengths, so each PATCH sends what its headers say."""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self._it = source.__aiter__()
        self._left = b""

    async def take(self, n: int) -> AsyncIterator[bytes]:
        while n > 0:
            if not self._left:
                try:
                    self._left = await self._it.__anext__()
                except StopAsyncIteration:
                    return
                if not self._left:
                    continue
            if len(self._left) <= n:  # the usual case: the whole chunk, not a copy of it
                data, self._left = self._left, b""
            else:
                data, self._left = self._left[:n], self._left[n:]
            n -= len(data)
            yield data


async def _feed(patch: Patch, chunks: AsyncIterator[bytes], hasher, progress: Callable[[int], None] | None) -> None:
    """Send ``chunks`` through ``patch``: received here while a worker thread hashes and sends the ones before."""
    send, recv = trio.open_memory_channel(FEED_DEPTH)

    async def produce() -> None:
        async with send:
            async for data in chunks:
                await send.send(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with recv:
            async for data in recv:
                await patch.send(data, hasher)
                if progress is not None:
                    progress(len(data))


async def _file_pieces(fd: int, start: int, n: int) -> AsyncIterator[bytes]:
    """``fd``'s bytes ``[start, start + n)``, read in worker threads."""
    end = start + n
    while start < end:
        data = await trio.to_thread.run_sync(os.pread, fd, min(FILE_READ, end - start), start)
        if not data:
            return
        start += len(data)
        yield data
