"""One blob range as one stream of bytes, whatever the network does in between.

:class:`BlobStream` is what :meth:`RegistryClient.open <.client.RegistryClient.open>` hands out:
it tries the blob's sources in order, resumes a cut body from the byte where it stopped, copes with
hosts that ignore ``Range`` or answer 416, and — once httpx has fetched a range of a source cleanly —
reads later long ranges of it through :mod:`.direct`, off the trio thread. It sends everything
through a :class:`~.transport.RegistryTransport`, and knows of the client only the sources it
was given.
"""

from __future__ import annotations

import logging
import re
from typing import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx

from ..descriptors import ACCEPT_MANIFESTS, Descriptor
from ..errors import ImagefsError, NotFound, RegistryError, RegistryUnreachable
from .direct import Body, Lost, Refused
from .retry import FALLBACK_ATTEMPTS, Retrier, retryable_transport
from .transport import RegistryTransport, Source, reason
from .tuning import DIRECT_MIN

__all__ = ["BlobStream", "reason"]  # reason: push imports it from here

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class BlobStream:
    """Bytes ``[pos, end)`` of one blob as one stream.

    Sources are tried in order (see :meth:`RegistryClient.blob_sources`): on ``NotFound`` the
    next one, on another failure the next *host*. A body cut short is asked for again from
    ``pos`` with ``Range: bytes=pos-(end-1)`` on the same source, so nothing already received is
    fetched twice; an answer that starts before ``pos`` (a 200 from a server that ignores Range,
    or a 206 wider than asked) is skipped up to it; a 416 gets one more try without Range.
    """

    def __init__(self, transport: RegistryTransport, sources: Callable[[], list[Source]], desc: Descriptor,
                 start: int, end: int) -> None:
        self.transport = transport
        self.find_sources = sources  # asked on the first connect: which hosts are up is decided then
        self.desc = desc
        self.pos = start
        self.end = end
        self.what = f"blob {desc.digest}"
        self.sources: list[Source] | None = None
        self.index = 0
        self.errors: list[ImagefsError] = []
        self.resp: httpx.Response | None = None
        self.raw: AsyncIterator[bytes] | None = None
        self.body: Body | None = None  # the direct path's body, instead of resp/raw
        self.skip = 0
        self.whole = False  # after a 416 or a wrong range: ask this source for whole bodies
        self.retrier: Retrier | None = None

    @property
    def source(self) -> Source:
        assert self.sources is not None
        return self.sources[self.index]

    async def connect(self) -> None:
        """Have a body positioned at ``pos``: on the current source, else the next ones."""
        if self.sources is None:
            self.sources = self.find_sources()
        while True:
            try:
                await self._open(self.source)
                return
            except ImagefsError as exc:
                await self._fail_over(exc)

    async def _fail_over(self, error: ImagefsError) -> None:
        """Move to the next source that may help, or raise the error that explains most."""
        assert self.sources is not None
        self.errors.append(error)
        current = self.source
        nxt = self.index + 1
        if not isinstance(error, NotFound):  # this host is failing: its other paths will too
            while nxt < len(self.sources) and self.sources[nxt].host is current.host:
                nxt += 1
        if nxt >= len(self.sources):
            # A NotFound from a last resort (a foreign URL) should not hide that the registry failed.
            worst = [e for e in self.errors if not isinstance(e, NotFound)]
            raise (worst or self.errors)[-1]
        if current.host is not self.sources[nxt].host:
            nxt_source = self.sources[nxt]
            target = nxt_source.host if nxt_source.kind != "url" else _origin(nxt_source.url)
            self.transport.failed_over(current.host, error, target)
        self.index = nxt
        self.retrier = None
        self.whole = False

    def _retrier_for(self, source: Source) -> Retrier:
        assert self.sources is not None
        last_host = self.sources[-1].host
        policy = self.transport.retry
        if source.host is not last_host:
            policy = policy.with_attempts(FALLBACK_ATTEMPTS)
        return self.transport.retrier(policy, f"GET at {source.host.label}")

    async def _open_direct(self, source: Source) -> bool:
        """Open ``[pos, end)`` on the direct path if this source has a recipe; False to use httpx."""
        direct = self.transport.direct
        if direct is None or self.whole or self.end - self.pos < DIRECT_MIN:
            return False
        recipe = direct.recipe(source.url)
        if recipe is None:
            return False
        try:
            self.body = await self.transport.get_direct(recipe, self.pos, self.end, self.desc.size)
            log.debug("%s: bytes %d-%d direct from %s", self.what, self.pos, self.end - 1, recipe.origin)
            return True
        except (Refused, OSError) as exc:  # httpx asks again, and judges the answer
            direct.forget(source.url)
            log.debug("%s: direct request to %s: %s; asking through httpx", self.what, recipe.origin, reason(exc))
            return False

    async def _open(self, source: Source) -> None:
        if self.retrier is None:
            self.retrier = self._retrier_for(source)
        if await self._open_direct(source):
            return
        transport = self.transport
        while True:
            headers = {"Accept-Encoding": "identity"}  # a CDN must not gzip the bytes we hash
            if source.kind == "manifests":
                headers["Accept"] = f"{self.desc.media_type}, {ACCEPT_MANIFESTS}"
            ranged = not self.whole and (self.pos > 0 or self.end < self.desc.size)
            if ranged:
                headers["Range"] = f"bytes={self.pos}-{self.end - 1}"
            params = None if source.kind != "url" else {}
            resp = await transport.request(source.host, "GET", source.url, headers=headers, what=self.what,
                                           retrier=self.retrier, params=params)
            status = resp.status_code
            if status == 206:
                first = _range_start(resp.headers.get("content-range"))
                if first is None:
                    first = self.pos if ranged else 0
                if first > self.pos:
                    await resp.aclose()
                    if self.whole:
                        raise RegistryError(f"{transport.ref.name}: {self.what}: registry sent a range starting at "
                                            f"{first} for a request of the whole blob")
                    log.debug("%s: asked for bytes from %d, got a range from %d; asking for the whole blob",
                              self.what, self.pos, first)
                    self.whole = True
                    continue
                self.skip = self.pos - first
                total = _range_total(resp.headers.get("content-range"))
            elif status == 200:
                if ranged:
                    log.debug("%s: %s ignored Range; skipping %d bytes", self.what, source.host.label, self.pos)
                self.skip = self.pos
                length = resp.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
            elif status == 416 and not self.whole:
                error = await transport.status_error(resp, self.what, source.host)
                log.debug("%s: 416 for bytes=%d-%d (%s); asking for the whole blob", self.what, self.pos, self.end - 1, error)
                self.whole = True
                continue
            else:
                raise await transport.status_error(resp, self.what, source.host)
            mismatch = self._mismatch(resp, total)
            if mismatch is not None:
                await resp.aclose()
                raise mismatch
            if source.kind != "manifests" and self._exact(resp):
                # exactly the range asked, as the direct path checks it: later ranges can skip httpx
                transport.learn(source, resp.request)
            self.resp = resp
            self.raw = resp.aiter_raw()  # no chunk_size: re-chunking copies every byte (measured 2.5x slower)
            return

    def _exact(self, resp: httpx.Response) -> bool:
        """Whether ``resp`` is the clean answer :mod:`.direct` accepts (so a recipe is not learned
        from one answer and refused on the next, forever)."""
        h = resp.headers
        return (resp.status_code == 206 and resp.http_version == "HTTP/1.1" and "transfer-encoding" not in h
                and h.get("content-range") == f"bytes {self.pos}-{self.end - 1}/{self.desc.size}"
                and h.get("content-length") == str(self.end - self.pos))

    def _mismatch(self, resp: httpx.Response, total: int | None) -> RegistryError | None:
        """A host whose blob is encoded or has another size than the descriptor's cannot have our bytes."""
        encoding = resp.headers.get("content-encoding", "identity")
        if encoding != "identity":
            return RegistryError(f"{self.source.host.label}: {self.what}: sent with Content-Encoding {encoding}, "
                                 "not as the blob's own bytes")
        if total is not None and total != self.desc.size:
            return RegistryError(f"{self.source.host.label}: {self.what}: the host's blob has {total} bytes, "
                                 f"the descriptor says {self.desc.size}")
        return None

    async def _next(self) -> bytes | bytearray | None:
        """The next piece of the current body; None at its end. Transport failures raise
        ``httpx.TransportError`` (httpx) or :class:`Lost` (direct)."""
        if self.body is not None:
            return await self.body.read()
        assert self.raw is not None
        try:
            return await self.raw.__anext__()
        except StopAsyncIteration:
            return None

    async def chunks(self) -> AsyncIterator[bytes | bytearray]:
        while self.pos < self.end:
            if self.resp is None and self.body is None:
                await self.connect()
            assert self.retrier is not None
            try:
                chunk = await self._next()
            except (httpx.TransportError, Lost) as exc:
                await self.drop()
                error = self._lost(exc)
                if (isinstance(exc, Lost) or retryable_transport(exc)) and await self.retrier.wait(error):
                    continue
                await self._fail_over(self.retrier.gave_up(error))
                continue
            if chunk is None:
                await self.drop()
                error = RegistryError(f"{self.what} from {self.source.host.endpoint.netloc}: the stream ended at byte "
                                      f"{self.pos} of {self.end}")
                if await self.retrier.wait(error):
                    continue
                await self._fail_over(self.retrier.gave_up(error))
                continue
            if self.skip:
                if len(chunk) <= self.skip:
                    self.skip -= len(chunk)
                    continue
                chunk = chunk[self.skip:]
                self.skip = 0
            if len(chunk) > self.end - self.pos:  # slicing copies: only when needed
                chunk = chunk[: self.end - self.pos]
            self.pos += len(chunk)
            self.transport.received(len(chunk), direct=self.body is not None)
            self.retrier.progress()
            yield chunk
        await self.drop()

    def _lost(self, exc: Exception) -> RegistryError:
        netloc = self.source.host.endpoint.netloc
        cause = exc.__cause__ if isinstance(exc, Lost) else exc
        if isinstance(cause, (httpx.TimeoutException, TimeoutError)):
            return RegistryUnreachable(f"registry {netloc}: no answer within {self.transport.timeout:g} s ({type(cause).__name__})")
        return RegistryError(f"{self.what} from {netloc}: connection lost at byte {self.pos} of {self.end}: "
                             f"{reason(cause if isinstance(cause, Exception) else exc)}")

    async def drop(self) -> None:
        """Let go of the current body (an httpx connection is not reused after a partial read)."""
        body, self.body = self.body, None
        if body is not None:
            body.close()
        raw, self.raw = self.raw, None
        resp, self.resp = self.resp, None
        if raw is not None:
            await raw.aclose()  # type: ignore[attr-defined]
        if resp is not None:
            await resp.aclose()


def _range_start(value: str | None) -> int | None:
    match = _CONTENT_RANGE.match(value or "")
    return int(match.group(1)) if match else None


def _range_total(value: str | None) -> int | None:
    match = _CONTENT_RANGE.match(value or "")
    return int(match.group(3)) if match and match.group(3).isdigit() else None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"

