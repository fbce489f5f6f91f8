"""A registry client for one repository: the distribution protocol, on :mod:`.transport`.

It resolves a reference to a descriptor (``HEAD``, then ``GET`` where a registry refuses
``HEAD``), fetches manifests by digest and verifies them before anyone sees them, and streams
blobs, asking for closed ranges only: some registries refuse ``bytes=N-`` and some break when
asked past the end. How a request travels — hosts, retries, errors, the direct path, counters — is
:mod:`.transport`'s business; this module says which requests to send and what their answers mean.

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

import functools
import hashlib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Sequence
from urllib.parse import urlsplit

import httpx

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
from ..errors import DigestMismatch, InvalidManifest, NotFound
from ..reference import Reference
from .auth import Credentials
from .blobstream import BlobStream
from .hosts import LOOPBACK_HOSTS, Endpoint, uses_plain_http
from .retry import FALLBACK_ATTEMPTS, FETCH, RESOLVE, RetryPolicy, retryable_transport
from .transport import Host, RegistryStatistics, RegistryTransport, Source, error_detail

# error_detail, uses_plain_http and LOOPBACK_HOSTS are imported from here by other modules (push).
__all__ = ["RegistryClient", "RegistryStatistics", "uses_plain_http", "LOOPBACK_HOSTS", "error_detail"]


class RegistryClient:
    """Reads one repository of one registry. Nothing touches the network until asked.

    The requests go through :attr:`transport` (a :class:`~.transport.RegistryTransport`, built
    from the same options): hosts, retries, errors and counters live there.
    """

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
        self.transport = RegistryTransport(ref, plain_http=plain_http, insecure=insecure, ca_file=ca_file,
                                           cert_dir=cert_dir, credentials=credentials, timeout=timeout,
                                           transport=transport, mirrors=mirrors, hosts_dir=hosts_dir,
                                           retry=retry, resolve_retry=resolve_retry)

    @property
    def _direct(self):
        """The direct path's client, for tests that count its requests."""
        return self.transport.direct

    def statistics(self) -> RegistryStatistics:
        """What this client sent and received so far (a frozen snapshot)."""
        return self.transport.statistics()

    async def aclose(self) -> None:
        await self.transport.aclose()

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
        return await self.transport.each_host(need, lambda host, last: self._resolve_at(host, obj, last))

    async def _resolve_at(self, host: Host, obj: str, last: bool) -> Descriptor:
        policy = self.transport.resolve_retry if last else self.transport.resolve_retry.with_attempts(FALLBACK_ATTEMPTS)
        what = f"manifest {obj}"
        resp = await self.transport.request(host, "HEAD", host.endpoint.url(self.ref.repository, "manifests", obj),
                                            headers={"Accept": ACCEPT_MANIFESTS}, what=what,
                                            retrier=self.transport.retrier(policy, f"HEAD at {host.label}"))
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
            raise await self.transport.status_error(resp, what, host)
        # HEAD refused or incomplete: GET it, and hash what we got.
        data, media_type = await self._get_manifest_at(host, obj, policy)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if obj.startswith("sha256:") and digest != obj:
            raise DigestMismatch(f"{self.ref.name}: manifest {obj} has digest {digest}")
        return Descriptor(media_type, digest, len(data))

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        """A manifest or index by digest, verified against ``desc`` before it is returned."""

        async def at(host: Host, last: bool) -> bytes:
            policy = self.transport.retry if last else self.transport.retry.with_attempts(FALLBACK_ATTEMPTS)
            data, _ = await self._get_manifest_at(host, desc.digest, policy)
            verify(desc, data)
            return data

        return await self.transport.each_host({"pull"}, at)

    async def referrers(self, digest: str, artifact_type: str) -> bytes | None:
        """The OCI referrers API's index of what refers to ``digest``, asked for ``artifact_type``;
        None where the registry has no such API (404: distribution 2.8), so the caller can read the
        ``sha256-<hex>`` referrers tag instead. Unverified by nature: the caller treats it so."""

        async def at(host: Host, last: bool) -> bytes | None:
            policy = self.transport.retry if last else self.transport.retry.with_attempts(FALLBACK_ATTEMPTS)
            what = f"referrers of {digest}"
            resp = await self.transport.request(host, "GET", host.endpoint.url(self.ref.repository, "referrers", digest),
                                                headers={"Accept": OCI_INDEX}, what=what,
                                                retrier=self.transport.retrier(policy, f"GET at {host.label}"),
                                                params={**host.endpoint.params(), "artifactType": artifact_type})
            if resp.status_code == 404:
                await resp.aclose()
                return None
            if resp.status_code != 200:
                raise await self.transport.status_error(resp, what, host)
            try:
                data, _ = await self._read_manifest(resp, digest)
            except httpx.TransportError as exc:
                raise self.transport.transport_error(exc, host) from exc
            finally:
                await resp.aclose()
            self.transport.received(len(data))
            return data

        return await self.transport.each_host({"pull"}, at)

    async def _get_manifest_at(self, host: Host, obj: str, policy: RetryPolicy) -> tuple[bytes, str]:
        """GET a manifest; a body cut short is asked again, a whole one never (pulls are counted)."""
        what = f"manifest {obj}"
        retrier = self.transport.retrier(policy, f"GET at {host.label}")
        url = host.endpoint.url(self.ref.repository, "manifests", obj)
        while True:
            resp = await self.transport.request(host, "GET", url, headers={"Accept": ACCEPT_MANIFESTS}, what=what,
                                                retrier=retrier)
            if resp.status_code != 200:
                raise await self.transport.status_error(resp, what, host)
            try:
                data, media_type = await self._read_manifest(resp, obj)
            except httpx.TransportError as exc:
                error = self.transport.transport_error(exc, host)
                if retryable_transport(exc) and await retrier.wait(error):
                    continue
                raise retrier.gave_up(error) from exc
            finally:
                await resp.aclose()
            check_supported(media_type)
            self.transport.received(len(data))
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
        stream = BlobStream(self.transport, functools.partial(self.blob_sources, desc), desc, start, end)
        chunks = stream.chunks()
        try:
            if start < end:
                await stream.connect()
            yield chunks
        finally:
            await chunks.aclose()
            await stream.drop()

    def blob_sources(self, desc: Descriptor) -> list[Source]:
        """Where ``desc``'s bytes may be asked for, in order: each pull host, then its own ``urls``."""
        if has_children(desc):
            kinds = ["manifests"]
        elif desc.media_type in LAYER_TYPES or desc.media_type in CONFIG_TYPES:
            kinds = ["blobs"]
        else:
            kinds = ["blobs", "manifests"]
        sources = [
            Source(host, host.endpoint.url(self.ref.repository, kind, desc.digest), kind)
            for host in self.transport.hosts_for({"pull"})
            for kind in kinds
        ]
        upstream = self.transport.upstream
        for url in desc.urls:
            if urlsplit(url).scheme in ("http", "https"):
                origin = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
                sources.append(Source(Host(Endpoint(origin + "/v2"), upstream.http, "url", upstream.tls), url, "url"))
        return sources

    _blob_sources = blob_sources  # the name tests use
