"""The HTTP side of a :class:`~.push.Pusher`: requests, retries, one-line errors, and the socket route.

Split from :mod:`.push` so the order of a push (what to ask, in which order, when to resume) reads
apart from how one request is made. httpx sends every request with :class:`~.auth.RegistryAuth`
(distribution's challenge for a ``POST`` names ``repository:NAME:pull,push``, so the token asked
for carries the push scope). Requests with no streamed body are retried here for 429/5xx, resets
and timeouts; a streamed ``PATCH`` is tried once and the caller resumes it. Once httpx has opened
an upload, its request is kept as a :class:`~.sendbody.Route` and ``PATCH`` bodies go on a plain
socket (:meth:`PushHttp.patch_on_socket`); a custom transport (tests) keeps every byte on httpx.
A refusal is one line: ``access denied to NAME (anonymous): push``.
"""

from __future__ import annotations

import logging

import httpx

from ..errors import ImagefsError, NotFound, RegistryError, RegistryUnreachable, Unauthorized
from ..reference import Reference
from .auth import Credentials, RegistryAuth
from .credentials import ssl_context
from .retry import RETRY_STATUSES, Retrier, RetryPolicy, parse_retry_after, retryable_transport
from .sendbody import Answered, ChunkReader, Patch, Route, feed, route_of
from .transport import error_detail, read_error_body, reason

__all__ = ["PushHttp"]

log = logging.getLogger(__name__)

#: Error bodies are read for the registry's message, never more than this.


class PushHttp:
    """httpx for one registry repository, with its retry policy and the route learned for PATCH bodies."""

    def __init__(self, ref: Reference, *, insecure: bool, ca_file: str | None, cert_dir: str | None,
                 credentials: Credentials | None, timeout: float, transport: httpx.AsyncBaseTransport | None,
                 retry: RetryPolicy) -> None:
        self.ref = ref
        self.auth = RegistryAuth(credentials)
        self.tls = ssl_context(ca_file, insecure, cert_dir)
        self.direct = transport is None
        self.route: Route | None = None
        self.http = httpx.AsyncClient(
            auth=self.auth,
            verify=self.tls,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
            transport=transport,
            headers={"User-Agent": "imagefs/0.1"},
        )
        self.timeout = timeout
        self.retry = retry
        self.requests = 0

    async def aclose(self) -> None:
        await self.http.aclose()

    def learn_route(self, resp: httpx.Response) -> None:
        """Keep how httpx reached the registry for ``resp`` (the ``POST`` that opened an upload)."""
        if self.direct:
            self.route = route_of(resp.request, self.tls)

    def route_for(self, location: str) -> Route | None:
        """The socket route for an upload at ``location``, if one is known for its origin."""
        route = self.route
        return route if route is not None and route.serves(httpx.URL(location)) else None

    async def cancel(self, location: str) -> None:
        """Leave no upload dangling; a registry that will not cancel expires it later anyway."""
        try:
            resp = await self.http.delete(location)
            await resp.aclose()
        except httpx.HTTPError as exc:
            log.debug("%s: cancelling an upload: %s", self.ref.name, reason(exc))

    def location(self, resp: httpx.Response, default: str | None = None) -> str:
        """The upload URL ``resp`` points to (``Location``, resolved against the request), else ``default``."""
        location = resp.headers.get("location")
        if not location:
            if default is not None:
                return default
            raise RegistryError(f"{self.ref.name}: the registry gave no upload location (HTTP {resp.status_code})")
        return str(resp.request.url.join(location))

    async def once(self, method: str, url: str, *, what: str, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None, content=None) -> httpx.Response:
        """One request; a failure to get an answer is our error (the caller decides on retries)."""
        self.requests += 1
        try:
            request = self.http.build_request(method, url, headers=headers, params=params, content=content)
            resp = await self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self.transport_error(exc) from exc
        except httpx.StreamError as exc:  # a body that had to be sent twice (an unexpected challenge)
            raise RegistryError(f"{self.ref.name}: {what}: {reason(exc)}") from exc
        if resp.status_code in RETRY_STATUSES:
            raise await self.status_error(resp, what)
        return resp

    async def request(self, method: str, url: str, *, what: str, headers: dict[str, str] | None = None,
                      params: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
        """A request with no streamed body, retried for 429/5xx, resets and timeouts."""
        retrier = Retrier(self.retry, f"{self.ref.name}: {what}")
        while True:
            self.requests += 1
            try:
                resp = await self.http.request(method, url, headers=headers, params=params, content=content)
            except httpx.TransportError as exc:
                error = self.transport_error(exc)
                if retryable_transport(exc) and await retrier.wait(error):
                    continue
                raise retrier.gave_up(error) from exc
            if resp.status_code not in RETRY_STATUSES:
                return resp
            error = await self.status_error(resp, what)
            hint = parse_retry_after(resp.headers.get("retry-after")) if resp.status_code in (429, 503) else None
            if await retrier.wait(error, hint):
                continue
            raise retrier.gave_up(error)

    def transport_error(self, exc: httpx.TransportError) -> RegistryError:
        """Our error for a request httpx could not complete: unreachable, timed out, or cut."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return RegistryUnreachable(f"cannot reach registry {self.ref.host}: {reason(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return RegistryUnreachable(f"registry {self.ref.host}: no answer within {self.timeout:g} s ({type(exc).__name__})")
        return RegistryError(f"registry {self.ref.host}: {reason(exc)}")

    async def status_error(self, resp: httpx.Response, what: str) -> ImagefsError:
        """The error an unwanted answer means, with the registry's own message when it sent one."""
        body = await read_error_body(resp)
        detail = error_detail(httpx.Response(resp.status_code, content=body))
        code = resp.status_code
        if code in (401, 403):
            return Unauthorized(f"access denied to {self.ref.name} ({self.auth.identity}): push{detail}")
        if code == 404:
            return NotFound(f"{self.ref.name}: {what}: not found{detail}")
        if code in (502, 503, 504):
            return RegistryUnreachable(f"registry {self.ref.host} unavailable: {what}: answered {code}{detail}")
        return RegistryError(f"{self.ref.name}: {what}: registry answered {code}{detail}")

    async def patch_on_socket(self, route: Route, location: str, start: int, n: int, what: str, chunks: ChunkReader | None,
                              fd: int | None, hasher, progress) -> tuple[httpx.Response, int]:
        """One PATCH through :class:`~.sendbody.Patch`, its body ``n`` bytes of ``chunks`` (fed to ``hasher``) or of
        ``fd`` from ``start``: the registry's answer as a response (retryable answers raised), and the bytes sent."""
        self.requests += 1
        url = httpx.URL(location)
        log.debug("%s: %s: bytes %d-%d on the socket route to %s", self.ref.name, what, start, start + n - 1, route.origin)
        patch = Patch(route, url, start, n, self.timeout)
        try:
            async with patch:
                await patch.open()
                if fd is not None:
                    await patch.send_file(fd, start, n, progress)
                else:
                    await feed(patch, chunks.take(n), hasher, progress)
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
            raise await self.status_error(resp, what)
        return resp, patch.sent
