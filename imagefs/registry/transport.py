"""How a request reaches a registry: its hosts, retries, status errors, the direct path, counters.

:class:`RegistryTransport` knows nothing of manifests or blobs; :class:`~.client.RegistryClient`
speaks the distribution protocol through it, and :class:`~.blobstream.BlobStream` streams one
blob range through it. Keeping the two apart lets a reader of either see one concern at a time.

- **Hosts**: the endpoints :mod:`.hosts` lists, mirrors first, the registry last
  (:meth:`~RegistryTransport.hosts_for`). A mirror that cannot be reached is left out for
  :data:`MIRROR_COOLDOWN` seconds; :meth:`~RegistryTransport.each_host` runs an operation on each
  host in turn until one answers.
- **Requests**: :meth:`~RegistryTransport.request` retries 429, 5xx, resets and timeouts with a
  :class:`~.retry.Retrier` (jittered backoff); what is left becomes our error tree
  (:meth:`~RegistryTransport.status_error`, :meth:`~RegistryTransport.transport_error`).
- **The direct path**: :mod:`.direct` replays long ranges on a plain socket once httpx has
  fetched one range of that source cleanly (:meth:`~RegistryTransport.learn`,
  :meth:`~RegistryTransport.get_direct`).
- **Counters**: :meth:`~RegistryTransport.statistics`, a frozen record shown by the mount's
  ``user.imagefs.statistics``.

Secrets stay out of logs: at ``--debug`` httpx logs URLs and httpcore headers, so a filter drops
query strings (a CDN's signature) and cookie values before they are written.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence, TypeVar

import httpx
import trio

from ..errors import ImagefsError, NotFound, RegistryError, RegistryUnreachable, Unauthorized
from ..reference import Reference
from . import tuning
from .auth import Credentials, RegistryAuth
from .credentials import ssl_context, tls_failure
from .direct import Body, DirectClient, Recipe
from .hosts import Endpoint, endpoints, uses_plain_http
from .retry import FETCH, RESOLVE, RETRY_STATUSES, Retrier, RetryPolicy, parse_retry_after, retryable_transport

__all__ = ["RegistryTransport", "RegistryStatistics", "Host", "Source", "error_detail", "reason", "read_error_body"]

log = logging.getLogger(__name__)

tuning.apply()  # httpcore's read size, before any connection reads

#: How long a mirror that could not be reached is left out before it is tried again.
MIRROR_COOLDOWN = 30.0
#: Error bodies are read for the registry's message, never more than this.
MAX_ERROR_BODY = 64 * 1024
USER_AGENT = "imagefs/0.1"

T = TypeVar("T")


class _HideSecrets(logging.Filter):
    """At ``--debug`` httpx logs every request's URL and httpcore every response's headers. A
    redirect to a CDN carries a signature in its query string — a credential for a while — and a
    ``Set-Cookie`` may hold a session: log URLs without their query and cookies without value."""

    _QUERY = re.compile(r"(https?://[^\s'\"?]+)\?[^\s'\"]*")
    _COOKIE = re.compile(r"(\(b'set-cookie', b')[^']*(')", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) and a.query for a in record.args):
            record.args = tuple(str(a.copy_with(query=None)) + "?…" if isinstance(a, httpx.URL) and a.query else a
                                for a in record.args)
        if isinstance(record.msg, str) and ("?" in record.msg or "et-cookie" in record.msg.lower()):
            record.msg = self._COOKIE.sub(r"\1…\2", self._QUERY.sub(r"\1?…", record.msg))
        return True


for _name in ("httpx", "httpcore.http11", "httpcore.http2"):
    logging.getLogger(_name).addFilter(_HideSecrets())


@dataclass(eq=False)
class Host:
    """An endpoint and the httpx client that reaches it; ``role`` is registry, mirror or url."""

    endpoint: Endpoint
    http: httpx.AsyncClient
    role: str
    tls: bool | ssl.SSLContext  # what ``http`` verifies with: the direct path uses the same

    @property
    def upstream(self) -> bool:
        return self.role == "registry"

    @property
    def label(self) -> str:
        return f"{self.role} {self.endpoint.origin}"


@dataclass(frozen=True)
class Source:
    """One URL a blob may come from."""

    host: Host
    url: str
    kind: str  # "blobs", "manifests" or "url" (a foreign layer's own URL)


@dataclass(frozen=True)
class RegistryStatistics:
    """What one client sent and received, as trio's ``statistics()`` records are: a snapshot.

    ``requests`` counts every request sent, on either path (a retry is a request);
    ``direct_requests`` / ``direct_bytes`` are the part :mod:`.direct` carried; ``bytes_received``
    counts body bytes handed to callers (manifests and blob ranges), not error bodies or headers.
    """

    requests: int = 0
    bytes_received: int = 0
    direct_requests: int = 0
    direct_bytes: int = 0
    retries: int = 0  # waits before another try (a 429/5xx, a reset, a cut body)
    fallbacks: int = 0  # operations moved on to the next host (a mirror failing)


async def read_error_body(resp: httpx.Response) -> bytes:
    """The first :data:`MAX_ERROR_BODY` bytes of an unwanted answer's body, read tolerantly (a body
    cut short must not turn the registry's answer into a network error), and the response closed."""
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
    return bytes(body)


class RegistryTransport:
    """The hosts of one repository and the requests sent to them. Nothing touches the network
    until asked; :meth:`aclose` closes every connection it opened."""

    def __init__(self, ref: Reference, *, plain_http: bool = False, insecure: bool = False, ca_file: str | None = None,
                 cert_dir: str | None = None, credentials: Credentials | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None, mirrors: Sequence[str] = (),
                 hosts_dir: Path | str | None = None, retry: RetryPolicy = FETCH,
                 resolve_retry: RetryPolicy = RESOLVE) -> None:
        self.ref = ref
        self.timeout = timeout
        self.retry = retry
        self.resolve_retry = resolve_retry
        scheme = "http" if uses_plain_http(ref.host, plain_http) else "https"
        self.auth = RegistryAuth(credentials)
        self._tls: bool | ssl.SSLContext = ssl_context(ca_file, insecure, cert_dir)
        self._transport = transport
        self._http = self._client(self._tls, min(timeout, 10.0))
        # A custom transport (tests' MockTransport) is httpx's alone: no socket of our own then.
        self.direct = None if transport is not None else DirectClient(timeout=timeout, connect_timeout=min(timeout, 10.0))
        found = endpoints(ref.registry, f"{scheme}://{ref.host}", mirrors=mirrors, hosts_dir=hosts_dir, plain_http=plain_http)
        self.hosts = [self._host(ep, "registry" if i == len(found) - 1 else "mirror") for i, ep in enumerate(found)]
        self._down_until: dict[str, float] = {}
        self._counts = dict.fromkeys(RegistryStatistics.__dataclass_fields__, 0)
        if len(self.hosts) > 1:
            log.info("%s: trying %s", ref.registry, ", then ".join(h.label for h in self.hosts))

    def _client(self, tls: bool | ssl.SSLContext, connect: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(auth=self.auth, verify=tls, timeout=httpx.Timeout(self.timeout, connect=connect),
                                 follow_redirects=True, transport=self._transport, headers={"User-Agent": USER_AGENT})

    def _host(self, ep: Endpoint, role: str) -> Host:
        """A host shares the mount's client (its TLS options, its auth) unless hosts.toml sets its own."""
        if not ep.own_tls and ep.dial_timeout is None:
            return Host(ep, self._http, role, self._tls)
        tls = ep.tls()
        return Host(ep, self._client(tls, ep.dial_timeout if ep.dial_timeout is not None else min(self.timeout, 10.0)),
                    role, tls)

    async def aclose(self) -> None:
        if self.direct is not None:
            self.direct.close()
        for client in {id(h.http): h.http for h in self.hosts if h.http is not self._http}.values():
            await client.aclose()
        await self._http.aclose()

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(**self._counts)

    def received(self, n: int, *, direct: bool = False) -> None:
        """Count ``n`` body bytes handed to a caller."""
        self._counts["bytes_received"] += n
        if direct:
            self._counts["direct_bytes"] += n

    def retrier(self, policy: RetryPolicy, what: str) -> Retrier:
        """A :class:`Retrier` whose waits are counted in :meth:`statistics`."""
        return Retrier(policy, what, on_retry=self._count_retry)

    def _count_retry(self) -> None:
        self._counts["retries"] += 1

    # -- hosts and fallback ---------------------------------------------------------------------

    @property
    def upstream(self) -> Host:
        """The registry itself (always the last host)."""
        return self.hosts[-1]

    def hosts_for(self, capabilities: set[str]) -> list[Host]:
        """Hosts able to do this, in order; mirrors found unreachable lately are left out."""
        able = [h for h in self.hosts if capabilities <= h.endpoint.capabilities]
        if not able:
            raise RegistryError(f"{self.ref.registry}: no configured host may {' and '.join(sorted(capabilities))} "
                                f"(see the capabilities in hosts.toml)")
        now = trio.current_time()
        return [h for h in able[:-1] if self._down_until.get(h.endpoint.root, 0.0) <= now] + able[-1:]

    def failed_over(self, host: Host, error: ImagefsError, nxt: Host | str) -> None:
        """Log a fallback; a mirror that could not be reached is left out for a while."""
        self._counts["fallbacks"] += 1
        target = nxt if isinstance(nxt, str) else nxt.label
        if isinstance(error, RegistryUnreachable) and not host.upstream:
            self._down_until[host.endpoint.root] = trio.current_time() + MIRROR_COOLDOWN
            log.info("%s: %s; falling back to %s (and skipping this mirror for %.0f s)",
                     host.label, error, target, MIRROR_COOLDOWN)
        else:
            log.info("%s: %s; falling back to %s", host.label, error, target)

    async def each_host(self, capabilities: set[str], op: Callable[[Host, bool], Awaitable[T]]) -> T:
        """``op(host, last)`` on each able host in turn until one does not raise our error."""
        hosts = self.hosts_for(capabilities)
        for i, host in enumerate(hosts):
            last = i == len(hosts) - 1
            try:
                return await op(host, last)
            except ImagefsError as exc:
                if last:
                    raise
                self.failed_over(host, exc, hosts[i + 1])
        raise AssertionError("unreachable")  # pragma: no cover

    # -- requests -------------------------------------------------------------------------------

    async def request(self, host: Host, method: str, url: str, *, headers: dict[str, str], what: str,
                      retrier: Retrier, params: dict[str, str] | None = None) -> httpx.Response:
        """Send until an answer that is not worth retrying; the caller reads and closes it.

        429, 500, 502, 503 and 504 are retried (429 and 503 after their ``Retry-After``), as are
        resets and timeouts; what is left when the retrier gives up is raised as our error.
        """
        all_headers = httpx.Headers(list(host.endpoint.headers))
        all_headers.update(headers)
        params = host.endpoint.params() if params is None else params
        while True:
            self._counts["requests"] += 1
            request = host.http.build_request(method, url, headers=all_headers, params=params or None)
            try:
                resp = await host.http.send(request, stream=True)
            except httpx.TransportError as exc:
                error = self.transport_error(exc, host)
                if retryable_transport(exc, connect_timeout=host.upstream) and await retrier.wait(error):
                    continue
                raise retrier.gave_up(error) from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # too many redirects, a bad Location
                raise RegistryError(f"{host.label}: {what}: {reason(exc)}") from exc
            _log_rate_limit(host, resp)
            if resp.status_code not in RETRY_STATUSES:
                return resp
            error = await self.status_error(resp, what, host)
            hint = parse_retry_after(resp.headers.get("retry-after")) if resp.status_code in (429, 503) else None
            if await retrier.wait(error, hint):
                continue
            raise retrier.gave_up(error)

    def learn(self, source: Source, request: httpx.Request) -> None:
        """httpx fetched exactly the range asked of ``source``: later long ranges may go direct."""
        if self.direct is not None:
            self.direct.learn(source.url, request, source.host.tls, source.host.endpoint.dial_timeout)

    async def get_direct(self, recipe: Recipe, start: int, end: int, total: int) -> Body:
        """Bytes ``[start, end)`` on the direct path (counted); raises what :meth:`DirectClient.get` does."""
        assert self.direct is not None
        self._counts["requests"] += 1
        self._counts["direct_requests"] += 1
        return await self.direct.get(recipe, start, end, total)

    # -- errors ---------------------------------------------------------------------------------

    async def status_error(self, resp: httpx.Response, what: str, host: Host | None = None) -> ImagefsError:
        """The error an unwanted answer means, with the registry's own message when it sent one.

        The body is read briefly and tolerantly: docker-registry answers 416 with a
        ``Content-Length`` its body does not fill, and that must not look like a network failure.
        """
        body = await read_error_body(resp)
        headers = [(k, v) for k, v in resp.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        plain = httpx.Response(resp.status_code, headers=headers, content=body, request=resp.request)
        return self._error_for(plain, what, host=host.endpoint.netloc if host is not None else None)

    def transport_error(self, exc: httpx.TransportError, host: Host | None = None) -> RegistryError:
        """A network failure as our error: unreachable (so a mount may fall back) or not."""
        netloc = host.endpoint.netloc if host is not None else self.ref.host
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return RegistryUnreachable(f"cannot reach registry {netloc}: {reason(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return RegistryUnreachable(f"registry {netloc}: no answer within {self.timeout:g} s ({type(exc).__name__})")
        return RegistryError(f"registry {netloc}: {reason(exc)}")

    def _error_for(self, resp: httpx.Response, what: str, *, host: str | None = None) -> ImagefsError:
        code = resp.status_code
        detail = error_detail(resp)
        name = self.ref.name
        if code == 404:
            return NotFound(f"{name}: {what} not found{detail}")
        if code in (401, 403):
            return Unauthorized(f"access denied to {name} ({self.auth.identity}){detail}")
        if code == 429:
            return RegistryError(f"{name}: rate limited by the registry (429){detail}")
        if code in (502, 503, 504):
            # A gateway with no registry behind it: as good as unreachable.
            return RegistryUnreachable(f"registry {host or self.ref.host} unavailable: {what}: answered {code}{detail}")
        return RegistryError(f"{name}: {what}: registry answered {code}{detail}")


def _log_rate_limit(host: Host, resp: httpx.Response) -> None:
    """Docker Hub's pull allowance (``ratelimit-limit: 100;w=21600``), for ``--debug``."""
    limit, remaining = resp.headers.get("ratelimit-limit"), resp.headers.get("ratelimit-remaining")
    if limit or remaining:
        log.debug("%s: rate limit: ratelimit-remaining %s, ratelimit-limit %s", host.label, remaining or "?", limit or "?")


def error_detail(resp: httpx.Response) -> str:
    """The registry's own error message (``{"errors":[{"code","message"}]}``), briefly."""
    try:
        errors = resp.json().get("errors") or []
        msgs = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
        return f" ({'; '.join(msgs)[:200]})" if msgs else ""
    except Exception:
        return ""


def reason(exc: BaseException) -> str:
    """The first line of what went wrong, TLS failures explained."""
    text = tls_failure(exc) or str(exc) or type(exc).__name__  # type: ignore[arg-type]
    return text.splitlines()[0]
