"""A registry client for one repository, on httpx.

It resolves a reference to a descriptor (``HEAD``, then ``GET`` where a registry refuses
``HEAD``), fetches manifests by digest and verifies them before anyone sees them, and streams
blobs, asking for closed ranges only: some registries refuse ``bytes=N-`` and some break when
asked past the end. Transport errors become the :mod:`imagefs.errors` tree here.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx

from ..descriptors import (
    ACCEPT_MANIFESTS,
    CONFIG_TYPES,
    LAYER_TYPES,
    MAX_MANIFEST_SIZE,
    Descriptor,
    check_supported,
    has_children,
    sniff_media_type,
    verify,
)
from ..errors import (
    DigestMismatch,
    InvalidManifest,
    NotFound,
    RegistryError,
    RegistryUnreachable,
    Unauthorized,
)
from ..reference import Reference
from .auth import Credentials, RegistryAuth

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
CHUNK = 1 << 20


def uses_plain_http(host: str, plain_http: bool) -> bool:
    """HTTP only when asked, or for a registry on this machine (as Docker treats localhost)."""
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return plain_http or hostname in LOOPBACK_HOSTS


class RegistryClient:
    """Reads one repository of one registry. Nothing touches the network until asked."""

    def __init__(
        self,
        ref: Reference,
        *,
        plain_http: bool = False,
        insecure: bool = False,
        ca_file: str | None = None,
        credentials: Credentials | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.ref = ref
        scheme = "http" if uses_plain_http(ref.host, plain_http) else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        tls: bool | ssl.SSLContext = True
        if insecure:
            tls = False
        elif ca_file:
            tls = ssl.create_default_context(cafile=ca_file)
        self._http = httpx.AsyncClient(
            auth=RegistryAuth(credentials),
            verify=tls,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
            transport=transport,
            headers={"User-Agent": "imagefs/0.1"},
        )
        self.requests = 0
        self.bytes_received = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- resolution -----------------------------------------------------------------------------

    async def resolve(self, obj: str | None = None) -> Descriptor:
        """The descriptor a tag or digest names now (``HEAD`` costs no pull on Docker Hub)."""
        obj = obj or self.ref.object
        url = f"{self.base}/manifests/{obj}"
        headers = {"Accept": ACCEPT_MANIFESTS}
        resp = await self._send("HEAD", url, headers=headers)
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
        elif resp.status_code not in (400, 405, 501) and resp.status_code != 404:
            self._raise_for(resp, f"manifest {obj}")
        elif resp.status_code == 404:
            raise NotFound(f"{self.ref.name}:{obj}: manifest unknown (the registry has no such tag or digest)")
        # HEAD refused or incomplete: GET it, and hash what we got.
        data, media_type = await self._get_manifest(obj)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if obj.startswith("sha256:") and digest != obj:
            raise DigestMismatch(f"{self.ref.name}: manifest {obj} has digest {digest}")
        return Descriptor(media_type, digest, len(data))

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        """A manifest or index by digest, verified against ``desc`` before it is returned."""
        data, _ = await self._get_manifest(desc.digest)
        verify(desc, data)
        return data

    async def _get_manifest(self, obj: str) -> tuple[bytes, str]:
        url = f"{self.base}/manifests/{obj}"
        async with self._stream("GET", url, headers={"Accept": ACCEPT_MANIFESTS}, what=f"manifest {obj}") as resp:
            length = resp.headers.get("content-length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
                raise InvalidManifest(f"{self.ref.name}@{obj}: manifest of {length} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit")
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > MAX_MANIFEST_SIZE:
                    raise InvalidManifest(f"{self.ref.name}@{obj}: manifest exceeds the {MAX_MANIFEST_SIZE} byte limit")
            media_type = sniff_media_type(bytes(buf), resp.headers.get("content-type"))
        check_supported(media_type)
        self.bytes_received += len(buf)
        return bytes(buf), media_type

    # -- blobs ----------------------------------------------------------------------------------

    @asynccontextmanager
    async def open(self, desc: Descriptor, start: int = 0, end: int | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream ``desc``'s bytes ``[start, end)``; the caller verifies (the store does, at commit).

        Manifests come from ``/manifests/``, layers and configs from ``/blobs/``. Anything else
        (artifacts, signatures) is tried at ``/blobs/`` and then ``/manifests/``, since registries
        store many artifacts as manifests.
        """
        end = desc.size if end is None else min(end, desc.size)
        if has_children(desc):
            kinds = ["manifests"]
        elif desc.media_type in LAYER_TYPES or desc.media_type in CONFIG_TYPES:
            kinds = ["blobs"]
        else:
            kinds = ["blobs", "manifests"]
        headers = {}
        ranged = start > 0 or end < desc.size
        if ranged:
            headers["Range"] = f"bytes={start}-{end - 1}"
        for i, kind in enumerate(kinds):
            if kind == "manifests":
                headers["Accept"] = f"{desc.media_type}, {ACCEPT_MANIFESTS}"
            try:
                async with self._stream("GET", f"{self.base}/{kind}/{desc.digest}", headers=headers, what=f"blob {desc.digest}") as resp:
                    if ranged and resp.status_code == 200:
                        # The registry ignored Range: skip to where we wanted to be.
                        yield self._slice(resp, start, end)
                    else:
                        yield self._chunks(resp, end - start)
                    return
            except NotFound:
                if i == len(kinds) - 1:
                    raise

    async def _chunks(self, resp: httpx.Response, limit: int) -> AsyncIterator[bytes]:
        got = 0
        try:
            async for chunk in resp.aiter_raw(CHUNK):
                if got + len(chunk) > limit:
                    chunk = chunk[: limit - got]
                got += len(chunk)
                self.bytes_received += len(chunk)
                yield chunk
                if got >= limit:
                    return
        except httpx.TransportError as exc:
            raise RegistryError(f"{self.ref.name}: connection lost after {got} bytes: {exc!r}") from exc
        if got < limit:
            raise RegistryError(f"{self.ref.name}: registry closed the stream after {got} of {limit} bytes")

    async def _slice(self, resp: httpx.Response, start: int, end: int) -> AsyncIterator[bytes]:
        pos = 0
        async for chunk in self._chunks(resp, end):
            lo, hi = max(start - pos, 0), len(chunk)
            pos += len(chunk)
            if lo < hi:
                yield chunk[lo:hi]

    # -- plumbing -------------------------------------------------------------------------------

    async def _send(self, method: str, url: str, **kw) -> httpx.Response:
        self.requests += 1
        try:
            return await self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc

    @asynccontextmanager
    async def _stream(self, method: str, url: str, *, what: str, **kw) -> AsyncIterator[httpx.Response]:
        self.requests += 1
        try:
            async with self._http.stream(method, url, **kw) as resp:
                if resp.status_code not in (200, 206):
                    await resp.aread()
                    self._raise_for(resp, what)
                yield resp
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc

    def _transport_error(self, exc: httpx.TransportError) -> RegistryError:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return RegistryUnreachable(f"cannot reach registry {self.ref.host}: {_reason(exc)}")
        return RegistryError(f"registry {self.ref.host}: {_reason(exc)}")

    def _raise_for(self, resp: httpx.Response, what: str) -> None:
        code = resp.status_code
        detail = _error_detail(resp)
        if code == 404:
            raise NotFound(f"{self.ref.name}: {what} not found{detail}")
        if code in (401, 403):
            raise Unauthorized(f"access denied to {self.ref.name} (anonymous){detail}")
        if code == 429:
            raise RegistryError(f"{self.ref.name}: rate limited by the registry (429){detail}")
        if code in (502, 503, 504):
            # A gateway with no registry behind it: as good as unreachable.
            raise RegistryUnreachable(f"registry {self.ref.host} unavailable: {what}: answered {code}{detail}")
        raise RegistryError(f"{self.ref.name}: {what}: registry answered {code}{detail}")


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _error_detail(resp: httpx.Response) -> str:
    """The registry's own error message (``{"errors":[{"code","message"}]}``), briefly."""
    try:
        errors = resp.json().get("errors") or []
        msgs = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
        return f" ({'; '.join(msgs)[:200]})" if msgs else ""
    except Exception:
        return ""
