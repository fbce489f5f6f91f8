"""The direct body path (imagefs/registry/direct.py) against the real registry and the fault proxy.

httpx makes the first request of a blob source; once its answer was a clean 206, long ranges of
that source are replayed on a plain socket read in worker threads. What must hold: the bytes are
the blob's; anything odd (a 401, a cut body, a host that ignores Range, a redirect) ends on the
right bytes with nothing fetched twice; credentials follow httpx's rules; cancelling does not wait
for the network. And a cold ``cat`` through a real mount reads the blob through it.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import subprocess
import time
from contextlib import AsyncExitStack

import httpx
import trio

from imagefs.descriptors import OCI_LAYER_GZIP, Descriptor
from imagefs.testing import images as im
from imagefs.testing.push import push
from imagefs.reference import parse
from imagefs.registry import chunkpool
from imagefs.registry.client import RegistryClient
from imagefs.registry.tuning import DIRECT_BODIES, DIRECT_CHUNK
from tests.support import Proxy
from tests.support.mounting import Mount
from tests.support.tls import CA, TLSFront, TLSRegistry
from tests.test_registry_transport import challenge_then_redirect, read

TEST_TIME_LIMIT = 60
MiB = 1 << 20


def shared_desc(images) -> Descriptor:
    return Descriptor(OCI_LAYER_GZIP, images.shared.digest, images.shared.size)


def ranges(proxy: Proxy, digest: str) -> list[str | None]:
    return [h.request_headers.get("range") for h in proxy.gets(digest)]


async def test_long_ranges_go_direct_once_httpx_had_a_clean_answer(proxy, images):
    desc, data = shared_desc(images), images.shared.data
    async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
        assert await read(client, desc, 0, 64 * 1024) == data[: 64 * 1024]  # httpx; learns the recipe
        assert client._direct.requests == 0
        assert await read(client, desc, MiB, 7 * MiB) == data[MiB : 7 * MiB]
        assert await read(client, desc, 7 * MiB) == data[7 * MiB :]  # on the kept connection
        assert await read(client, desc, 100, 200) == data[100:200]  # short: httpx's pool
        assert client._direct.requests == 2
    assert ranges(proxy, desc.digest) == ["bytes=0-65535", f"bytes={MiB}-{7 * MiB - 1}",
                                          f"bytes={7 * MiB}-{desc.size - 1}", "bytes=100-199"]
    assert proxy.bytes_sent(desc.digest) == 64 * 1024 + desc.size - MiB + 100


async def test_open_direct_bodies_are_bounded(proxy, images):
    """Each direct body holds up to two chunks: past DIRECT_BODIES at once, streams use httpx."""
    desc, data = shared_desc(images), images.shared.data
    async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
        await read(client, desc, 0, 1000)
        async with AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(client.open(desc, i * MiB, (i + 1) * MiB))
                       for i in range(DIRECT_BODIES + 1)]
            assert client._direct.requests == DIRECT_BODIES
            assert client._direct.pool.bodies == DIRECT_BODIES
            for i, stream in enumerate(streams):
                assert b"".join([bytes(c) async for c in stream]) == data[i * MiB : (i + 1) * MiB]
        assert client._direct.pool.bodies == 0


async def test_chunk_buffers_are_reused_only_once_nobody_holds_them(proxy, monkeypatch):
    """Chunk buffers are pooled page-aligned maps (a fresh one costs a page fault per 4 KiB, and an
    aligned one can be written with O_DIRECT): one a caller still holds is never handed out again,
    and one it dropped is; the pool outlives a stream, not an idle while."""
    monkeypatch.setattr(chunkpool, "IDLE", 0.3)
    layer = im.random_layer(40 * MiB, seed=11, path="opt/big.bin")
    push(proxy.host, "test/pool", im.image([layer]), "v1")
    desc, data = Descriptor(OCI_LAYER_GZIP, layer.digest, layer.size), layer.data
    async with RegistryClient(parse(f"{proxy.host}/test/pool:v1")) as client:
        await read(client, desc, 0, 1000)
        async with client.open(desc, MiB) as chunks:
            held = [chunk async for chunk in chunks]
        full = [c for c in held if len(c) == DIRECT_CHUNK]
        assert len(full) >= 8 and len({id(c.obj) for c in full}) == len(full), "a held buffer is not handed out again"
        assert b"".join(held) == data[MiB:]
        del held, full
        digest, used, seen = hashlib.sha256(), set(), 0
        async with client.open(desc, MiB) as chunks:
            async for chunk in chunks:  # each chunk dropped once consumed: the same buffers come back
                digest.update(chunk)
                seen += len(chunk) == DIRECT_CHUNK
                if isinstance(chunk, memoryview):  # not a short tail (a bytearray)
                    used.add(id(chunk.obj))
        assert digest.digest() == hashlib.sha256(data[MiB:]).digest()
        assert seen >= 8 and len(used) <= 3
        kept = {id(b) for b in client._direct.pool.buffers}
        async with client.open(desc, MiB) as chunks:  # the next stream's chunks come from the same maps
            assert id((await anext(chunks)).obj) in kept
        assert client._direct.pool.buffers, "kept between streams"
        await trio.sleep(1)
        assert client._direct.pool.buffers == [], "released once no body has been open for a while"


async def test_direct_chunks_end_on_a_mib_of_the_blob(proxy):
    """Wherever a range starts, its chunks soon end on MiB boundaries of the blob, so all but the
    first start on a page and can be written with O_DIRECT."""
    layer = im.random_layer(24 * MiB, seed=12, path="opt/big.bin")
    push(proxy.host, "test/grain", im.image([layer]), "v1")
    desc, data = Descriptor(OCI_LAYER_GZIP, layer.digest, layer.size), layer.data
    async with RegistryClient(parse(f"{proxy.host}/test/grain:v1")) as client:
        await read(client, desc, 0, 1000)
        start, ends, got = 123_457, [], []
        async with client.open(desc, start) as chunks:
            async for chunk in chunks:
                got.append(bytes(chunk))
                ends.append(start + sum(map(len, got)))
        assert b"".join(got) == data[start:]
        assert client._direct.requests == 1 and len(ends) >= 6
        assert all(end % (256 << 10) == 0 for end in ends[:-1])
        assert all(end % MiB == 0 for end in ends[2:-1]), [end / MiB for end in ends]


async def test_a_cut_direct_body_resumes_from_the_byte_where_it_stopped(proxy, images):
    desc, data = shared_desc(images), images.shared.data
    async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
        await read(client, desc, 0, 1000)
        proxy.reset()
        cut = proxy.cut(desc.digest, after=1_500_000, times=2)
        assert await read(client, desc, MiB) == data[MiB:]
        assert cut.applied == 2
        assert client._direct.requests == 3
    first, second = MiB + 1_500_000, MiB + 3_000_000
    assert ranges(proxy, desc.digest) == [f"bytes={MiB}-{desc.size - 1}", f"bytes={first}-{desc.size - 1}",
                                          f"bytes={second}-{desc.size - 1}"]
    assert proxy.bytes_sent(desc.digest) == desc.size - MiB, "no byte twice"


async def test_a_401_on_the_direct_path_goes_back_through_httpx(proxy, images, caplog):
    desc, data = shared_desc(images), images.shared.data
    async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
        await read(client, desc, 0, 1000)
        proxy.reset()
        proxy.respond(rf"/blobs/{desc.digest}", 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', times=1)
        with caplog.at_level(logging.DEBUG, logger="imagefs.registry.blobstream"):
            assert await read(client, desc, MiB, 3 * MiB) == data[MiB : 3 * MiB]
        assert "answered 401; asking through httpx" in caplog.text
        assert [h.status for h in proxy.gets(desc.digest)] == [401, 206]
        # httpx's clean answer taught the recipe again
        assert await read(client, desc, 3 * MiB, 5 * MiB) == data[3 * MiB : 5 * MiB]
        assert client._direct.requests == 2


async def test_a_host_that_ignores_range_is_never_replayed(proxy, images):
    desc, data = shared_desc(images), images.shared.data
    proxy.ignore_range(rf"/blobs/{desc.digest}")
    async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
        assert await read(client, desc, 0, 1000) == data[:1000]
        assert await read(client, desc, MiB, 3 * MiB) == data[MiB : 3 * MiB]
        assert client._direct.requests == 0
        assert client._direct.recipe(client._blob_sources(desc)[0].url) is None


async def test_a_redirect_is_replayed_at_its_target_without_authorization(registry, proxy, images, caplog):
    """The recipe is httpx's final request: the CDN's URL, and no Authorization there."""
    desc, data = shared_desc(images), images.shared.data
    token = "imagefs-test-token-fastpath"
    with Proxy(registry.host) as cdn:
        challenge_then_redirect(proxy, cdn, desc.digest, token)
        with caplog.at_level(logging.DEBUG):
            async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
                assert await read(client, desc, 0, 1000) == data[:1000]
                assert await read(client, desc, 2 * MiB, 6 * MiB) == data[2 * MiB : 6 * MiB]
                assert client._direct.requests == 1
        assert [h.status for h in proxy.gets(desc.digest)] == [401, 307], "the replay went to the CDN"
        at_cdn = cdn.gets(desc.digest)
        assert [h.request_headers.get("range") for h in at_cdn] == ["bytes=0-999", f"bytes={2 * MiB}-{6 * MiB - 1}"]
        assert all("authorization" not in h.request_headers for h in at_cdn)
        assert all(h.path.endswith("?sig=s3cr3t-sig") for h in at_cdn)
    assert token not in caplog.text and "s3cr3t-sig" not in caplog.text


async def test_cancelling_a_stalled_direct_request_does_not_wait_for_it(proxy, images):
    desc = shared_desc(images)
    async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
        await read(client, desc, 0, 1000)
        proxy.delay(rf"/blobs/{desc.digest}", 20, times=1)
        started = trio.current_time()
        with trio.move_on_after(0.5):
            await read(client, desc, MiB, 5 * MiB)
        assert trio.current_time() - started < 2
        assert client._direct.requests == 1


async def test_tls_bodies_are_read_direct_with_the_same_trust(tmp_path):
    """Over HTTPS the replay verifies with the client's own CA (``--ca-file``), or not at all
    with ``--insecure``, as httpx did."""
    ca = CA()
    blob = im.random_layer(3 * MiB, seed=11)
    with TLSRegistry(tmp_path / "reg", ca) as reg:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(reg.ca_path))) as http:
            push(reg.host, "tls/app", im.image([blob]), "v1", plain_http=False, client=http)
        desc = Descriptor(OCI_LAYER_GZIP, blob.digest, blob.size)
        for options in ({"ca_file": str(reg.ca_path)}, {"insecure": True}):
            async with RegistryClient(parse(f"{reg.host}/tls/app:v1"), **options) as client:
                assert await read(client, desc, 0, 1000) == blob.data[:1000]
                assert await read(client, desc, 1000) == blob.data[1000:]
                assert client._direct.requests == 1, options


async def test_a_tls_body_that_hangs_mid_way_times_out_and_resumes(proxy, images, tmp_path, caplog):
    """The kernel's receive timeout does not end a read on a TLS socket (OpenSSL retries a
    blocking socket's EAGAIN), so a direct TLS body has a socket timeout of its own: a registry
    that hangs mid-body costs the client's timeout, then the rest is fetched again."""
    desc = shared_desc(images)
    ca = CA()
    caplog.set_level(logging.DEBUG, logger="imagefs.registry")  # the retry says why it retried
    with TLSFront(proxy.host, ca) as front:
        async with RegistryClient(parse(f"{front.host}/test/oci:v1"), ca_file=str(ca.write_cert(tmp_path / "ca.pem")),
                                  timeout=1.0) as client:
            assert await read(client, desc, 0, 1000) == images.shared.data[:1000]  # httpx; learns the recipe
            front.stall_next_connection(after=256 << 10)  # the direct request's connection
            with trio.fail_after(30):  # without a timeout of its own it would hang until the front closes
                assert await read(client, desc, MiB, 5 * MiB) == images.shared.data[MiB:5 * MiB]
            assert client._direct.requests >= 2, "the body was read direct, and resumed direct"
    assert "no answer within 1 s" in caplog.text


def test_a_cold_cat_through_a_mount_reads_the_blob_direct(proxy, images, mnt, cache_dir):
    """Through a real mount: the right bytes, committed, and most of them fetched directly."""
    blob = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, "--platform", "linux/amd64", "--debug") as m:
        path = mnt / f"layer-{blob.digest}" / "blob"
        out = subprocess.run(["cat", str(path)], capture_output=True, check=True).stdout
        assert hashlib.sha256(out).hexdigest() == blob.digest.split(":")[1]
        assert proxy.bytes_sent(blob.digest) == blob.size, "no byte twice"
        assert f"blob {blob.digest}: bytes " in m.log_text() and " direct from " in m.log_text()
        deadline = time.monotonic() + 10
        while not (cache_dir / "blobs" / "sha256" / blob.digest.split(":")[1]).exists():
            assert time.monotonic() < deadline, m.log_text()
            time.sleep(0.05)
