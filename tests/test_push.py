"""The registry push transport (:class:`imagefs.registry.push.Pusher`) against a real
docker-registry, behind the counting, fault-injecting proxy: what ``imagefs copy`` builds on.
``test_copy`` drives it through the command line; these check what the command line cannot see."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from contextlib import asynccontextmanager

import bcrypt
import httpx
import pytest

from imagefs.descriptors import Descriptor
from imagefs.errors import DigestMismatch, RegistryError, Unauthorized
from imagefs.reference import parse
from imagefs.registry.push import Pusher
from tests.support import Registry
from tests.support.tls import CA, TLSRegistry
from tests.support.tokenserver import Rule, TokenServer


def blob(data: bytes) -> Descriptor:
    return Descriptor("application/vnd.oci.image.layer.v1.tar", f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))


def source(data: bytes, piece: int = 100_000, opened: list | None = None):
    """``open_source(offset)`` over ``data``, in odd-sized pieces; ``opened`` records the offsets."""

    @asynccontextmanager
    async def open_source(offset: int):
        if opened is not None:
            opened.append(offset)

        async def gen():
            for i in range(offset, len(data), piece):
                yield data[i:i + piece]

        yield gen()

    return open_source


def stored(host: str, repo: str, digest: str) -> bytes | None:
    resp = httpx.get(f"http://{host}/v2/{repo}/blobs/{digest}")
    return resp.content if resp.status_code == 200 else None


async def test_a_multi_chunk_blob_goes_up_in_segments_and_reads_back(proxy, registry):
    data = os.urandom(3 * 1024 * 1024 + 12345)
    desc = blob(data)
    sent = []
    async with Pusher(parse(f"{proxy.host}/push/chunks"), chunk_size=1 << 20) as pusher:
        assert not await pusher.blob_exists(desc)
        await pusher.upload_blob(desc, source(data), progress=sent.append)
        assert await pusher.blob_exists(desc)
        assert not await pusher.blob_exists(Descriptor(desc.media_type, desc.digest, desc.size + 1)), "a size mismatch is absent"
        stats = pusher.statistics()
    assert stored(registry.host, "push/chunks", desc.digest) == data
    patches = [h for h in proxy.hits if h.method == "PATCH"]
    assert len(patches) == 4 and sum(int(h.request_headers["content-length"]) for h in patches) == len(data)
    assert sum(sent) == len(data)
    assert stats.blobs_uploaded == 1 and stats.bytes_uploaded == len(data) and stats.resumes == 0


def refuse_the_second_patch(proxy, faults: list):
    """A progress callback that, once a PATCH has been answered 202, has the proxy refuse the next
    one with a 502. Each PATCH waits a little at the proxy before its fate is looked up, and the
    callback runs as the next one's first bytes go out: the refusal is in place by then, and never
    catches the first (its 202 came first)."""
    proxy.delay(r"/blobs/uploads/", 0.2, method="PATCH")

    def progress(n: int) -> None:
        if not faults and any(h.method == "PATCH" and h.status == 202 for h in proxy.hits):
            faults.append(proxy.respond(r"/blobs/uploads/", 502, b"cut", method="PATCH", times=1))

    return progress


async def test_a_cut_segment_resumes_at_the_registrys_offset(proxy, registry):
    data = os.urandom(4 * 1024 * 1024)
    desc = blob(data)
    opened: list[int] = []
    faults: list = []
    progress = refuse_the_second_patch(proxy, faults)
    async with Pusher(parse(f"{proxy.host}/push/resume"), chunk_size=1 << 20) as pusher:
        await pusher.upload_blob(desc, source(data, piece=1 << 16, opened=opened), progress=progress)
        assert pusher.statistics().resumes == 1
    assert faults and faults[0].applied == 1
    assert stored(registry.host, "push/resume", desc.digest) == data
    assert opened == [0, 1 << 20], "reopened at the offset the registry reported"
    landed = sum(int(h.request_headers["content-length"]) for h in proxy.hits if h.method == "PATCH" and h.fault is None)
    assert landed == len(data), "no byte reached the registry twice"
    assert any(h.method == "GET" and "/blobs/uploads/" in h.path for h in proxy.hits), "asked the upload where it stood"


async def test_bytes_that_do_not_match_the_digest_are_never_stored(proxy, registry):
    data = os.urandom(2 * 1024 * 1024)
    desc = blob(data)
    bad = bytearray(data)
    bad[-1] ^= 1
    async with Pusher(parse(f"{proxy.host}/push/corrupt"), chunk_size=1 << 20) as pusher:
        with pytest.raises(DigestMismatch, match=desc.digest):
            await pusher.upload_blob(desc, source(bytes(bad)))
        assert not await pusher.blob_exists(desc)
    assert not any(h.method == "PUT" for h in proxy.hits), "the final PUT is never sent for a wrong blob"
    assert any(h.method == "DELETE" for h in proxy.hits), "the upload was cancelled"


class LocalFile:
    """A blob that is a local file, as a copy hands over a committed cache blob; counts what was read."""

    def __init__(self, path) -> None:
        self.path = path
        self.sent = 0

    def read(self, n: int) -> None:
        self.sent += n


def never_opened(offset: int):
    raise AssertionError("a local file is sent from the file, not through open_source")


def on_the_socket(hit) -> bool:
    """A PATCH sent by the socket route (sendbody) rather than httpx: it alone asks to close."""
    return hit.request_headers.get("connection", "").lower() == "close"


async def test_a_local_file_goes_by_sendfile_and_a_cut_segment_resumes_at_the_registrys_offset(proxy, registry, tmp_path):
    data = os.urandom(4 * 1024 * 1024 + 4321)
    desc = blob(data)
    path = tmp_path / "blob"
    path.write_bytes(data)
    local = LocalFile(path)
    faults: list = []
    refuse = refuse_the_second_patch(proxy, faults)
    total = 0

    def progress(n: int) -> None:
        nonlocal total
        total += n
        refuse(n)

    async with Pusher(parse(f"{proxy.host}/push/file"), chunk_size=1 << 20) as pusher:
        await pusher.upload_blob(desc, never_opened, progress=progress, file=local)
        assert pusher.statistics().resumes == 1
    assert faults and faults[0].applied == 1
    assert stored(registry.host, "push/file", desc.digest) == data
    patches = [h for h in proxy.hits if h.method == "PATCH" and h.fault is None]
    assert sum(int(h.request_headers["content-length"]) for h in patches) == len(data), "no byte reached it twice"
    assert all(on_the_socket(h) for h in patches)
    assert local.sent == total == len(data) + (1 << 20), "read: the whole file, and the refused segment again"
    assert [h.request_headers["content-range"] for h in patches][:2] == ["0-1048575", "1048576-2097151"], \
        "resumed at the offset the registry reported"


async def test_a_local_file_whose_bytes_do_not_hash_right_is_never_stored(proxy, registry, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    desc = blob(data)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    path = tmp_path / "blob"
    path.write_bytes(bytes(bad))
    async with Pusher(parse(f"{proxy.host}/push/rotten"), chunk_size=1 << 20) as pusher:
        with pytest.raises(DigestMismatch, match=desc.digest):
            await pusher.upload_blob(desc, never_opened, file=LocalFile(path))
        assert not await pusher.blob_exists(desc)
    assert not any(h.method == "PUT" for h in proxy.hits), "the final PUT is never sent for a wrong blob"
    assert any(h.method == "DELETE" for h in proxy.hits), "the upload was cancelled"


async def test_a_refused_socket_route_goes_back_through_httpx_and_finishes(proxy, registry, tmp_path):
    """A 401 on a PATCH sent on the socket (a token that expired) is not the end: httpx, which knows
    how to answer a challenge, asks where the upload stands and sends the rest."""
    data = os.urandom(3 * 1024 * 1024)
    desc = blob(data)
    refused = proxy.respond(r"/blobs/uploads/", 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', method="PATCH", times=1)
    async with Pusher(parse(f"{proxy.host}/push/rerouted"), chunk_size=1 << 20) as pusher:
        await pusher.upload_blob(desc, source(data))
        assert pusher.statistics().resumes == 0, "a reroute is not a failure"
    assert refused.applied == 1
    assert stored(registry.host, "push/rerouted", desc.digest) == data
    patches = [h for h in proxy.hits if h.method == "PATCH"]
    assert on_the_socket(patches[0]) and patches[0].status == 401
    assert patches[1:] and not any(on_the_socket(h) for h in patches[1:]), "httpx sent the rest"
    assert sum(int(h.request_headers["content-length"]) for h in patches[1:]) == len(data)


@pytest.fixture(scope="module")
def tls_basic_registry(tmp_path_factory):
    """htpasswd basic auth over TLS: the socket route must speak TLS and replay the Authorization httpx sent."""
    workdir = tmp_path_factory.mktemp("tls-push")
    ca = CA()
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(f"bob:{bcrypt.hashpw(BOB_PW.encode(), bcrypt.gensalt(4)).decode()}\n")
    with TLSRegistry(workdir, ca, extra_config={"auth": {"htpasswd": {"realm": "push", "path": str(htpasswd)}}}) as reg:
        yield reg, ca.write_cert(workdir / "ca.pem")


async def test_over_tls_with_basic_auth_a_file_and_a_stream_go_up_on_the_socket_route(tls_basic_registry, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    reg, ca_file = tls_basic_registry
    data = os.urandom(2 * 1024 * 1024 + 99)
    other = os.urandom(1024 * 1024 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    async with Pusher(parse(f"{reg.host}/tls/app"), ca_file=str(ca_file), credentials=lambda host: ("bob", BOB_PW),
                      chunk_size=1 << 20) as pusher:
        await pusher.upload_blob(blob(data), never_opened, file=LocalFile(path))
        await pusher.upload_blob(blob(other), source(other))
        assert await pusher.blob_exists(blob(data)) and await pusher.blob_exists(blob(other))
    auth = httpx.BasicAuth("bob", BOB_PW)
    for payload in (data, other):
        got = httpx.get(f"https://{reg.host}/v2/tls/app/blobs/{blob(payload).digest}",
                        verify=ssl.create_default_context(cafile=str(ca_file)), auth=auth)
        assert got.content == payload
    records = "\n".join(r.getMessage() for r in caplog.records)
    assert records.count(f"on the socket route to https://{reg.host}") == 5, "every PATCH (3 + 2 segments)"
    assert BOB_PW not in records


async def test_a_cross_repository_mount_sends_no_bytes_and_a_failed_one_leaves_no_upload(proxy, registry):
    data = os.urandom(512 * 1024)
    desc = blob(data)
    async with Pusher(parse(f"{proxy.host}/push/origin")) as origin:
        await origin.upload_blob(desc, source(data))
    proxy.reset()
    async with Pusher(parse(f"{proxy.host}/push/mounted")) as pusher:
        assert await pusher.mount_blob(desc, "push/origin")
        assert pusher.statistics().blobs_mounted == 1
        other = blob(os.urandom(1000))
        assert not await pusher.mount_blob(other, "push/origin"), "not in the source repository"
    assert stored(registry.host, "push/mounted", desc.digest) == data
    assert not any(h.method in ("PATCH", "PUT") for h in proxy.hits), "no blob byte sent"
    assert any(h.method == "DELETE" for h in proxy.hits), "the upload the registry opened instead is cancelled"


async def test_manifests_go_up_byte_for_byte_by_digest_and_by_tag(proxy, registry):
    config = b"{}"
    cdesc = Descriptor("application/vnd.oci.image.config.v1+json", f"sha256:{hashlib.sha256(config).hexdigest()}", 2)
    doc = (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":'
           b'{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":2},"layers":[]}  '
           % cdesc.digest.encode())
    mdesc = Descriptor("application/vnd.oci.image.manifest.v1+json", f"sha256:{hashlib.sha256(doc).hexdigest()}", len(doc))
    async with Pusher(parse(f"{proxy.host}/push/manifest")) as pusher:
        await pusher.upload_blob(cdesc, source(config))
        assert not await pusher.manifest_exists(mdesc)
        assert await pusher.put_manifest(mdesc.digest, doc, mdesc.media_type) == mdesc.digest
        assert await pusher.manifest_exists(mdesc)
        assert await pusher.put_manifest("v1", doc, mdesc.media_type) == mdesc.digest
    got = httpx.get(f"http://{registry.host}/v2/push/manifest/manifests/v1", headers={"Accept": mdesc.media_type})
    assert got.content == doc, "the exact bytes, trailing spaces and all"


async def test_a_registry_that_keeps_failing_is_retried_then_one_error(proxy):
    data = os.urandom(1000)
    fault = proxy.respond(r"/blobs/uploads/", 500, b'{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}',
                          {"Content-Type": "application/json"}, method="PATCH")
    async with Pusher(parse(f"{proxy.host}/push/broken")) as pusher:
        with pytest.raises(RegistryError, match="disk on fire") as err:
            await pusher.upload_blob(blob(data), source(data))
    assert fault.applied > 1, "retried before giving up"
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    rules = [Rule(None, "*", frozenset({"pull"})), Rule("bob", "*", frozenset({"pull", "push"}))]
    with TokenServer(tmp_path_factory.mktemp("tokens"), users={"bob": BOB_PW}, rules=rules) as issuer, \
            Registry(tmp_path_factory.mktemp("token-push"), extra_config=issuer.registry_config()) as reg:
        yield reg


BOB_PW = "bob-" + os.urandom(8).hex()


async def test_push_scope_anonymous_refused_in_one_line_credentials_push_and_no_secret_is_logged(token_registry, caplog):
    caplog.set_level(logging.DEBUG)
    data = os.urandom(5000)
    desc = blob(data)
    ref = parse(f"{token_registry.host}/team/app")
    async with Pusher(ref) as anonymous:
        with pytest.raises(Unauthorized) as err:
            await anonymous.upload_blob(desc, source(data))
    assert str(err.value).startswith(f"access denied to {token_registry.host}/team/app (anonymous): push")
    async with Pusher(ref, credentials=lambda host: ("bob", BOB_PW)) as bob:
        await bob.upload_blob(desc, source(data))
        assert await bob.blob_exists(desc)
    records = "\n".join(r.getMessage() for r in caplog.records)
    assert BOB_PW not in records and BOB_PW not in str(err.value)
