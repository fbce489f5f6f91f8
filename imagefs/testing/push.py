"""Put images built by :mod:`.images` into a registry through its HTTP API, exactly as built.

Typical use::

    digest = push("127.0.0.1:5000", "test/app", index([img, artifact()]))
"""

from __future__ import annotations

import json
from urllib.parse import quote, urljoin

import httpx

from .images import MANIFEST_TYPES, OCI_MANIFEST, Blob, Image, Index


class PushError(RuntimeError):
    """A registry refused a request; the message carries its error body."""

    def __init__(self, response: httpx.Response, what: str = "") -> None:
        self.response = response
        request = response.request
        body = response.text[:2000] if request.method != "HEAD" else ""
        super().__init__(f"{what or 'push'}: {request.method} {request.url} -> "
                         f"HTTP {response.status_code} {body}".rstrip())


def _manifest_type(blob: Blob) -> str | None:
    """The Content-Type to PUT ``blob`` as a manifest with, or None for a plain blob."""
    if blob.media_type in MANIFEST_TYPES:
        return blob.media_type
    try:
        doc = json.loads(blob.data)
    except ValueError:
        return None
    if isinstance(doc, dict) and "schemaVersion" in doc:
        return doc.get("mediaType") or OCI_MANIFEST
    return None


class _Pusher:
    """Pushes a tree bottom-up, so the registry never sees a dangling reference."""

    def __init__(self, client: httpx.Client, base: str) -> None:
        self.client, self.base, self.done = client, base, set()

    def node(self, node: Image | Index | Blob, ref: str | None = None, in_index: bool = False) -> None:
        if isinstance(node, Image):
            for blob in (node.config, *node.layers):
                self.blob(blob)
            self.manifest(node.manifest, ref, node.manifest.media_type)
        elif isinstance(node, Index):
            for child in node.children:
                self.node(child, in_index=True)
            self.manifest(node.index, ref, node.index.media_type)
        else:
            for dep in node.refs:
                self.node(dep)
            ctype = _manifest_type(node)
            if ctype is None and not in_index and ref is None:
                self.blob(node)
            else:  # an index only accepts manifests, so try as one and let the registry judge
                self.manifest(node, ref, ctype or node.media_type)

    def blob(self, blob: Blob) -> None:
        if blob.digest in self.done:
            return
        head = self.client.head(f"{self.base}blobs/{blob.digest}")
        if head.status_code != 200:
            _check(head, {404}, "blob check")
            start = _check(self.client.post(f"{self.base}blobs/uploads/"), {202}, "blob upload start")
            location = urljoin(str(start.url), start.headers["Location"])
            sep = "&" if "?" in location else "?"
            _check(self.client.put(f"{location}{sep}digest={quote(blob.digest)}", content=blob.data,
                                   headers={"Content-Type": "application/octet-stream"}),
                   {201}, f"blob upload {blob.digest}")
        self.done.add(blob.digest)

    def manifest(self, blob: Blob, ref: str | None, content_type: str) -> None:
        ref = ref or blob.digest
        if (blob.digest, ref) in self.done:
            return
        resp = _check(self.client.put(f"{self.base}manifests/{ref}", content=blob.data,
                                      headers={"Content-Type": content_type}),
                      {201}, f"manifest {ref}")
        stored = resp.headers.get("Docker-Content-Digest")
        if stored and stored != blob.digest:
            raise PushError(resp, f"registry stored manifest as {stored}, not {blob.digest}")
        self.done.add((blob.digest, ref))


def _check(resp: httpx.Response, ok: set[int], what: str) -> httpx.Response:
    if resp.status_code not in ok:
        raise PushError(resp, what)
    return resp


def push(registry: str, repo: str, target: Image | Index | Blob, tag: str | None = "latest", *,
         plain_http: bool = True, client: httpx.Client | None = None) -> str:
    """Put ``target`` and everything under it into ``registry``/``repo``, exactly
    as built; return the root digest.

    Blobs already present are skipped; manifests go up children first, by digest;
    the root goes up by ``tag`` (by digest when ``tag`` is None). A Blob target that
    is a manifest (known media type, or JSON with ``schemaVersion``) is pushed as
    one; any other Blob is uploaded as a plain blob and ``tag`` is ignored.
    ``registry`` is ``host:port`` or a full ``http(s)://`` URL.
    """
    base = registry if "://" in registry else f"{'http' if plain_http else 'https'}://{registry}"
    own = client is None
    client = client or httpx.Client(timeout=120)
    try:
        pusher = _Pusher(client, f"{base.rstrip('/')}/v2/{repo}/")
        if isinstance(target, Blob) and _manifest_type(target) is None:
            pusher.blob(target)
        else:
            pusher.node(target, tag)
        return target.digest
    finally:
        if own:
            client.close()
