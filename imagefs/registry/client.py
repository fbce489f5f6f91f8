"""A registry client for one repository, on httpx.

It resolves a reference to a descriptor (``HEAD``, then ``GET`` where a registry refuses
``HEAD``), fetches manifests by digest and verifies them before anyone sees them, and streams
blobs, asking for closed ranges only: some registries refuse ``bytes=N-`` and some break when
asked past the end. Transport errors become the :mod:`imagefs.errors` tree here.

The network is not trusted to behave. Every request goes to the hosts :mod:`.hosts` lists —
mirrors first, the registry last — falling back to the next host when one fails; each host gets
retries with jittered backoff (:mod:`.retry`) for 429, 5xx, resets and timeouts. A blob stream cut
in the middle resumes from the byte where it stopped, with a closed ``Range``, on the host that
was serving it, and a host that ignores ``Range`` or answers 416 still yields the right bytes:
callers of :meth:`RegistryClient.open` see one stream of exactly the bytes they asked for, or an
:class:`~imagefs.errors.ImagefsError` (:mod:`.blobstream`). Redirects (Docker Hub sends blobs to a
CDN) are followed by httpx, which keeps ``Range`` and drops ``Authorization`` when the origin
changes. Long ranges of a blob httpx has fetched once are read off the trio thread (:mod:`.direct`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import httpx
import trio

from ..descriptors import (
    ACCEPT_MANIFESTS,
    CONFIG_TYPES,
    LAYER_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    Descriptor,
    check_supported,
    has_children,
    sniff_media_type,
    verify,
)
from ..errors import (
    DigestMismatch,
    ImagefsError,
    InvalidManifest,
    NotFound,
    RegistryError,
    RegistryUnreachable,
    Unauthorized,
)
from ..reference import Reference
from . import tuning
from .auth import Credentials, RegistryAuth
from .blobstream import BlobStream, reason as _reason
from .credentials import ssl_context
from .direct import DirectClient
from .hosts import LOOPBACK_HOSTS, Endpoint, endpoints, uses_plain_http
from .retry import FALLBACK_ATTEMPTS, FETCH, RESOLVE, RETRY_STATUSES, Retrier, RetryPolicy, parse_retry_after, retryable_transport

__all__ = ["RegistryClient", "uses_plain_http", "LOOPBACK_HOSTS", "error_detail"]

log = logging.getLogger(__name__)

tuning.apply()  # httpcore's read size, before any connection reads

#: How long a mirror that could not be reached is left out before it is tried again.
MIRROR_COOLDOWN = 30.0
#: Error bodies are read for the registry's message, never more than this.
MAX_ERROR_BODY = 64 * 1024

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
class _Host:
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
class _Source:
    """One URL a blob may come from."""

    host: _Host
    url: str
    kind: str  # "blobs", "manifests" or "url" (a foreign layer's own URL)


class RegistryClient:
    """Reads one repository of one registry. Nothing touches the network until asked."""

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
        mirrors: Sequence[str] = (),
        hosts_dir: Path | str | None = None,
        retry: RetryPolicy = FETCH,
        resolve_retry: RetryPolicy = RESOLVE,
    ) -> None:
        self.ref = ref
        scheme = "http" if uses_plain_http(ref.host, plain_http) else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        tls: bool | ssl.SSLContext = ssl_context(ca_file, insecure, cert_dir)
        self._auth = RegistryAuth(credentials)
        self._http = httpx.AsyncClient(
            auth=self._auth,
            verify=tls,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
            transport=transport,
            headers={"User-Agent": "imagefs/0.1"},
        )
        self.timeout = timeout
        self.retry = retry
        self.resolve_retry = resolve_retry
        self.requests = 0
        self.bytes_received = 0
        found = endpoints(ref.registry, f"{scheme}://{ref.host}", mirrors=mirrors, hosts_dir=hosts_dir, plain_http=plain_http)
        self._tls = tls
        # A custom transport (tests' MockTransport) is httpx's alone: no socket of our own then.
        self._direct = None if transport is not None else DirectClient(timeout=timeout, connect_timeout=min(timeout, 10.0))
        self._hosts = [self._host(ep, "registry" if i == len(found) - 1 else "mirror", transport)
                       for i, ep in enumerate(found)]
        self._down_until: dict[str, float] = {}
        if len(self._hosts) > 1:
            log.info("%s: trying %s", ref.registry, ", then ".join(h.label for h in self._hosts))

    def _host(self, ep: Endpoint, role: str, transport: httpx.AsyncBaseTransport | None) -> _Host:
        """A host shares the mount's client (its TLS options, its auth) unless hosts.toml sets its own."""
        if not ep.own_tls and ep.dial_timeout is None:
            return _Host(ep, self._http, role, self._tls)
        connect = ep.dial_timeout if ep.dial_timeout is not None else min(self.timeout, 10.0)
        tls = ep.tls()
        http = httpx.AsyncClient(
            auth=self._auth,
            verify=tls,
            timeout=httpx.Timeout(self.timeout, connect=connect),
            follow_redirects=True,
            transport=transport,
            headers={"User-Agent": "imagefs/0.1"},
        )
        return _Host(ep, http, role, tls)

    async def aclose(self) -> None:
        if self._direct is not None:
            self._direct.close()
        for client in {id(h.http): h.http for h in self._hosts if h.http is not self._http}.values():
            await client.aclose()
        await self._http.aclose()

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- resolution -----------------------------------------------------------------------------

    async def resolve(self, obj: str | None = None) -> Descriptor:
        """The descriptor a tag or digest names now (``HEAD`` costs no pull on Docker Hub).

        A tag is resolved only by hosts trusted to (``resolve``); a digest by any ``pull`` host,
        since what it names is verified. 502/503/504 and timeouts are retried briefly, then raise
        :class:`RegistryUnreachable` so a mount can fall back to the tag it remembers.
        """
        obj = obj or self.ref.object
        need = {"pull"} if obj.startswith("sha256:") else {"pull", "resolve"}
        return await self._each_host(need, f"manifest {obj}", lambda host, last: self._resolve_at(host, obj, last))

    async def _resolve_at(self, host: _Host, obj: str, last: bool) -> Descriptor:
        policy = self.resolve_retry if last else self.resolve_retry.with_attempts(FALLBACK_ATTEMPTS)
        what = f"manifest {obj}"
        resp = await self._request(host, "HEAD", host.endpoint.url(self.ref.repository, "manifests", obj),
                                   headers={"Accept": ACCEPT_MANIFESTS}, what=what, retrier=Retrier(policy, f"HEAD at {host.label}"))
        await resp.aclose()
        if resp.status_code == 200:
            digest = resp.headers.get("docker-content-digest")
            length = resp.headers.get("content-length")
            media_type = (resp.headers.get("content-type") or "").split(";")[0].strip()
            if obj.startswith("sha256:"):
                digest = digest or obj
            if digest and length and length.isdigit() and media_type not in ("", "application/json"):
                check_supported(media_type)
                if obj.startswith("sha256:") and digest != obj:
                    raise DigestMismatch(f"{self.ref.name}: registry answered {digest} for {obj}")
                return Descriptor(media_type, digest, int(length))
        elif resp.status_code == 404:
            raise NotFound(f"{self.ref.name}:{obj}: manifest unknown (the registry has no such tag or digest)")
        elif resp.status_code not in (400, 405, 501):
            raise await self._status_error(resp, what, host)
        # HEAD refused or incomplete: GET it, and hash what we got.
        data, media_type = await self._get_manifest_at(host, obj, policy)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if obj.startswith("sha256:") and digest != obj:
            raise DigestMismatch(f"{self.ref.name}: manifest {obj} has digest {digest}")
        return Descriptor(media_type, digest, len(data))

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        """A manifest or index by digest, verified against ``desc`` before it is returned."""

        async def at(host: _Host, last: bool) -> bytes:
            policy = self.retry if last else self.retry.with_attempts(FALLBACK_ATTEMPTS)
            data, _ = await self._get_manifest_at(host, desc.digest, policy)
            verify(desc, data)
            return data

        return await self._each_host({"pull"}, f"manifest {desc.digest}", at)

    async def referrers(self, digest: str, artifact_type: str) -> bytes | None:
        """The OCI referrers API's index of what refers to ``digest``, asked for ``artifact_type``;
        None where the registry has no such API (404: distribution 2.8), so the caller can read the
        ``sha256-<hex>`` referrers tag instead. Unverified by nature: the caller treats it so."""

        async def at(host: _Host, last: bool) -> bytes | None:
            policy = self.retry if last else self.retry.with_attempts(FALLBACK_ATTEMPTS)
            what = f"referrers of {digest}"
            resp = await self._request(host, "GET", host.endpoint.url(self.ref.repository, "referrers", digest),
                                       headers={"Accept": OCI_INDEX}, what=what,
                                       retrier=Retrier(policy, f"GET at {host.label}"),
                                       params={**host.endpoint.params(), "artifactType": artifact_type})
            if resp.status_code == 404:
                await resp.aclose()
                return None
            if resp.status_code != 200:
                raise await self._status_error(resp, what, host)
            try:
                data, _ = await self._read_manifest(resp, digest)
            except httpx.TransportError as exc:
                raise self._transport_error(exc, host) from exc
            finally:
                await resp.aclose()
            self.bytes_received += len(data)
            return data

        return await self._each_host({"pull"}, f"referrers of {digest}", at)

    async def _get_manifest_at(self, host: _Host, obj: str, policy: RetryPolicy) -> tuple[bytes, str]:
        """GET a manifest; a body cut short is asked again, a whole one never (pulls are counted)."""
        what = f"manifest {obj}"
        retrier = Retrier(policy, f"GET at {host.label}")
        url = host.endpoint.url(self.ref.repository, "manifests", obj)
        while True:
            resp = await self._request(host, "GET", url, headers={"Accept": ACCEPT_MANIFESTS}, what=what, retrier=retrier)
            if resp.status_code != 200:
                raise await self._status_error(resp, what, host)
            try:
                data, media_type = await self._read_manifest(resp, obj)
            except httpx.TransportError as exc:
                error = self._transport_error(exc, host)
                if retryable_transport(exc) and await retrier.wait(error):
                    continue
                raise retrier.gave_up(error) from exc
            finally:
                await resp.aclose()
            check_supported(media_type)
            self.bytes_received += len(data)
            return data, media_type

    async def _read_manifest(self, resp: httpx.Response, obj: str) -> tuple[bytes, str]:
        length = resp.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
            raise InvalidManifest(f"{self.ref.name}@{obj}: manifest of {length} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit")
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > MAX_MANIFEST_SIZE:
                raise InvalidManifest(f"{self.ref.name}@{obj}: manifest exceeds the {MAX_MANIFEST_SIZE} byte limit")
        return bytes(buf), sniff_media_type(bytes(buf), resp.headers.get("content-type"))

    # -- blobs ----------------------------------------------------------------------------------

    @asynccontextmanager
    async def open(self, desc: Descriptor, start: int = 0, end: int | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream exactly ``desc``'s bytes ``[start, end)``; the caller verifies (the store does, at commit).

        Manifests come from ``/manifests/``, layers and configs from ``/blobs/``. Anything else
        (artifacts, signatures) is tried at ``/blobs/`` and then ``/manifests/``, since registries
        store many artifacts as manifests. A layer none of the hosts has is fetched from the
        descriptor's ``urls`` (foreign and non-distributable layers). The first request is made
        on entry, so a blob that is nowhere raises here; later failures raise from the iterator.
        """
        end = desc.size if end is None else min(end, desc.size)
        stream = BlobStream(self, desc, start, end)
        chunks = stream.chunks()
        try:
            if start < end:
                await stream.connect()
            yield chunks
        finally:
            await chunks.aclose()
            await stream.drop()

    def _blob_sources(self, desc: Descriptor) -> list[_Source]:
        if has_children(desc):
            kinds = ["manifests"]
        elif desc.media_type in LAYER_TYPES or desc.media_type in CONFIG_TYPES:
            kinds = ["blobs"]
        else:
            kinds = ["blobs", "manifests"]
        sources = [
            _Source(host, host.endpoint.url(self.ref.repository, kind, desc.digest), kind)
            for host in self._hosts_for({"pull"})
            for kind in kinds
        ]
        upstream = self._hosts[-1]
        for url in desc.urls:
            if urlsplit(url).scheme in ("http", "https"):
                origin = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
                sources.append(_Source(_Host(Endpoint(origin + "/v2"), upstream.http, "url", upstream.tls), url, "url"))
        return sources

    # -- hosts and fallback ---------------------------------------------------------------------

    def _hosts_for(self, capabilities: set[str]) -> list[_Host]:
        """Hosts able to do this, in order; mirrors found unreachable lately are left out."""
        able = [h for h in self._hosts if capabilities <= h.endpoint.capabilities]
        if not able:
            raise RegistryError(f"{self.ref.registry}: no configured host may {' and '.join(sorted(capabilities))} "
                                f"(see the capabilities in hosts.toml)")
        now = trio.current_time()
        return [h for h in able[:-1] if self._down_until.get(h.endpoint.root, 0.0) <= now] + able[-1:]

    def _failed_over(self, host: _Host, error: ImagefsError, nxt: _Host | str) -> None:
        """Log a fallback; a mirror that could not be reached is left out for a while."""
        if isinstance(error, RegistryUnreachable) and not host.upstream:
            self._down_until[host.endpoint.root] = trio.current_time() + MIRROR_COOLDOWN
            log.info("%s: %s; falling back to %s (and skipping this mirror for %.0f s)",
                     host.label, error, nxt if isinstance(nxt, str) else nxt.label, MIRROR_COOLDOWN)
        else:
            log.info("%s: %s; falling back to %s", host.label, error, nxt if isinstance(nxt, str) else nxt.label)

    async def _each_host(self, capabilities: set[str], what: str, op: Callable[[_Host, bool], Awaitable[T]]) -> T:
        hosts = self._hosts_for(capabilities)
        for i, host in enumerate(hosts):
            last = i == len(hosts) - 1
            try:
                return await op(host, last)
            except ImagefsError as exc:
                if last:
                    raise
                self._failed_over(host, exc, hosts[i + 1])
        raise AssertionError("unreachable")  # pragma: no cover

    # -- plumbing -------------------------------------------------------------------------------

    async def _request(self, host: _Host, method: str, url: str, *, headers: dict[str, str], what: str,
                       retrier: Retrier, params: dict[str, str] | None = None) -> httpx.Response:
        """Send until an answer that is not worth retrying; the caller reads and closes it.

        429, 500, 502, 503 and 504 are retried (429 and 503 after their ``Retry-After``), as are
        resets and timeouts; what is left when the retrier gives up is raised as our error.
        """
        all_headers = httpx.Headers(list(host.endpoint.headers))
        all_headers.update(headers)
        params = host.endpoint.params() if params is None else params
        while True:
            self.requests += 1
            request = host.http.build_request(method, url, headers=all_headers, params=params or None)
            try:
                resp = await host.http.send(request, stream=True)
            except httpx.TransportError as exc:
                error = self._transport_error(exc, host)
                if retryable_transport(exc, connect_timeout=host.upstream) and await retrier.wait(error):
                    continue
                raise retrier.gave_up(error) from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # too many redirects, a bad Location
                raise RegistryError(f"{host.label}: {what}: {_reason(exc)}") from exc
            _log_rate_limit(host, resp)
            if resp.status_code not in RETRY_STATUSES:
                return resp
            error = await self._status_error(resp, what, host)
            hint = parse_retry_after(resp.headers.get("retry-after")) if resp.status_code in (429, 503) else None
            if await retrier.wait(error, hint):
                continue
            raise retrier.gave_up(error)

    async def _status_error(self, resp: httpx.Response, what: str, host: _Host | None = None) -> ImagefsError:
        """The error an unwanted answer means, with the registry's own message when it sent one.

        The body is read briefly and tolerantly: docker-registry answers 416 with a
        ``Content-Length`` its body does not fill, and that must not look like a network failure.
        """
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
        headers = [(k, v) for k, v in resp.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        plain = httpx.Response(resp.status_code, headers=headers, content=bytes(body), request=resp.request)
        try:
            self._raise_for(plain, what, host=host.endpoint.netloc if host is not None else None)
        except ImagefsError as exc:
            return exc
        return RegistryError(f"{self.ref.name}: {what}: registry answered {resp.status_code}")  # pragma: no cover

    def _transport_error(self, exc: httpx.TransportError, host: _Host | None = None) -> RegistryError:
        netloc = host.endpoint.netloc if host is not None else self.ref.host
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return RegistryUnreachable(f"cannot reach registry {netloc}: {_reason(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return RegistryUnreachable(f"registry {netloc}: no answer within {self.timeout:g} s ({type(exc).__name__})")
        return RegistryError(f"registry {netloc}: {_reason(exc)}")

    def _raise_for(self, resp: httpx.Response, what: str, *, host: str | None = None) -> None:
        code = resp.status_code
        detail = error_detail(resp)
        if code == 404:
            raise NotFound(f"{self.ref.name}: {what} not found{detail}")
        if code in (401, 403):
            raise Unauthorized(f"access denied to {self.ref.name} ({self._auth.identity}){detail}")
        if code == 429:
            raise RegistryError(f"{self.ref.name}: rate limited by the registry (429){detail}")
        if code in (502, 503, 504):
            # A gateway with no registry behind it: as good as unreachable.
            raise RegistryUnreachable(f"registry {host or self.ref.host} unavailable: {what}: answered {code}{detail}")
        raise RegistryError(f"{self.ref.name}: {what}: registry answered {code}{detail}")


def _log_rate_limit(host: _Host, resp: httpx.Response) -> None:
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
