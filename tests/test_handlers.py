"""The fetch port (DESIGN.md §4) and the lazy reader, with an in-memory fetcher.

The fetcher is a stand-in for the registry so that interleavings can be forced; the same
behaviour is checked against a real registry through a real mount in test_mount.py.
"""

import hashlib
import json
import random
from contextlib import asynccontextmanager

import pytest
import trio

from imagefs import descriptors as d
from imagefs.content import LocalStore
from imagefs.errors import DigestMismatch, InvalidManifest
from imagefs.handlers import GC_REF, GC_ROOT, Backoff, dispatch, fetch
from imagefs.reader import BlobReader


def blob(data: bytes, mt=d.OCI_LAYER_GZIP) -> d.Descriptor:
    return d.Descriptor(mt, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


class MemoryFetcher:
    """Serves blobs from a dict in small chunks, yielding to trio between them."""

    def __init__(self, blobs: dict[str, bytes], chunk=4096, pause=0.0):
        self.blobs, self.chunk, self.pause = blobs, chunk, pause
        self.opens: list[str] = []
        self.ranges: list[tuple[int, int]] = []
        self.corrupt: set[str] = set()

    @asynccontextmanager
    async def open(self, desc, start=0, end=None):
        self.opens.append(desc.digest)
        self.ranges.append((start, desc.size if end is None else end))
        data = self.blobs[desc.digest]
        if desc.digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])

        async def chunks():
            for i in range(start, len(data) if end is None else end, self.chunk):
                await trio.sleep(self.pause)
                yield data[i : i + self.chunk]

        yield chunks()


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "cache")


def test_backoff_is_jittered_and_doubles_to_2048():
    random.seed(1)
    b = Backoff()
    bounds = []
    for _ in range(12):
        bound = b.retry
        delay = b.next_delay()
        assert 0 <= delay * 1000 < bound
        bounds.append(bound)
    assert bounds[:8] == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert bounds[8:] == [2048] * 4


async def test_concurrent_fetches_of_one_blob_fetch_once(store):
    data = random.randbytes(300_000)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, pause=0.001)
    async with trio.open_nursery() as n:
        for _ in range(16):
            n.start_soon(fetch, store, fetcher, desc)
    assert fetcher.opens == [desc.digest]
    assert store.path(desc.digest).read_bytes() == data


async def test_manifest_fetch_records_gc_labels_from_the_tee(store):
    config, layer = blob(b"{}", d.OCI_CONFIG), blob(b"layer")
    body = json.dumps({"schemaVersion": 2, "mediaType": d.OCI_MANIFEST, "config": config.to_json(),
                       "layers": [layer.to_json()]}).encode()
    man = blob(body, d.OCI_MANIFEST)
    await fetch(store, MemoryFetcher({man.digest: body}), man, root=True)
    labels = store.labels(man.digest)
    assert labels[f"{GC_REF}0"] == config.digest and labels[f"{GC_REF}1"] == layer.digest
    assert labels[GC_ROOT].endswith("Z") and labels["imagefs.mediatype"] == d.OCI_MANIFEST


async def test_manifest_with_right_digest_but_bad_json_is_not_committed(store):
    body = b'{"layers": "nope"}'
    man = blob(body, d.OCI_MANIFEST)
    with pytest.raises(InvalidManifest):
        await fetch(store, MemoryFetcher({man.digest: body}), man)
    assert store.path(man.digest) is None and store.active(man.ref_key) is None


async def test_dispatch_visits_each_descriptor_once():
    a, b, c = (blob(bytes([i])) for i in range(3))
    graph = {a.digest: [b, c], b.digest: [c], c.digest: []}
    visits = []

    async def handler(desc):
        visits.append(desc.digest)
        await trio.sleep(0)
        return graph[desc.digest]

    await dispatch(handler, [a, a])
    assert sorted(visits) == sorted([a.digest, b.digest, c.digest])


async def test_reader_herd_reads_once_and_serves_while_streaming(store):
    data = random.randbytes(1_000_000)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536, pause=0.002)
    results = {}
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg)
        # the head is served before the blob is complete
        first = await reader.read(desc, 0, 4096)
        assert first == data[:4096]
        assert store.path(desc.digest) is None, "served before the whole blob arrived"

        async def one(i):
            off = random.randrange(len(data))
            results[i] = (off, await reader.read(desc, off, 131072))

        async with trio.open_nursery() as n:
            for i in range(32):
                n.start_soon(one, i)
    for off, got in results.values():
        assert got == data[off : off + 131072]
    # 33 readers, several spans: each byte was asked of the registry at most once
    spans = sorted(fetcher.ranges)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), spans
    assert sum(e - s for s, e in spans) <= len(data)
    assert reader.statistics().requests == len(spans)


async def test_reader_end_of_corrupt_blob_is_an_error_and_retried_later(store):
    data = random.randbytes(200_000)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=8192, pause=0.001)
    fetcher.corrupt.add(desc.digest)
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg)
        with pytest.raises(DigestMismatch):
            await reader.read(desc, len(data) - 100, 100)
        assert store.path(desc.digest) is None
        fetcher.corrupt.clear()
        assert await reader.read(desc, len(data) - 100, 100) == data[-100:]
    assert len(fetcher.opens) == 2
    assert reader.statistics().verify_failures == 1


SPAN = 256 * 1024


async def test_random_reads_fetch_about_one_span_each(store):
    data = random.randbytes(8 << 20)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536)
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg, span=SPAN)
        rng = random.Random(5)
        offsets = [rng.randrange(len(data) - 4096) for _ in range(12)]
        for off in offsets:
            assert await reader.read(desc, off, 4096) == data[off : off + 4096]
        spans = {off // SPAN for off in offsets} | {(off + 4095) // SPAN for off in offsets}
        assert reader.statistics().bytes_fetched <= len(spans) * SPAN
        assert all(e - s <= SPAN and s % SPAN == 0 for s, e in fetcher.ranges)
        assert store.path(desc.digest) is None
        reader.close()


async def test_sequential_reader_streams_with_few_requests_and_commits(store):
    data = random.randbytes(8 << 20)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536)
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg, span=SPAN)
        handle = reader.open(desc, 1)
        out = bytearray()
        for off in range(0, len(data), 131072):
            out += await reader.read(desc, off, 131072, handle)
    assert bytes(out) == data
    assert store.path(desc.digest).read_bytes() == data
    assert len(fetcher.ranges) <= 8, fetcher.ranges  # windows widen: far fewer requests than spans (32)
    assert sum(e - s for s, e in fetcher.ranges) == len(data), "no byte fetched twice"


async def test_partial_blob_resumes_in_a_later_process(tmp_path):
    data = random.randbytes(4 << 20)
    desc = blob(data)
    first = MemoryFetcher({desc.digest: data}, chunk=65536)
    async with trio.open_nursery() as bg:
        reader = BlobReader(LocalStore(tmp_path / "c"), first, bg, span=SPAN)
        for off in (0, 3 << 20):
            await reader.read(desc, off, 4096)
        fetched_before = reader.fetched(desc)
        reader.close()  # unmount: keep the ingest (requests still in flight are cut)
    assert 8192 <= fetched_before < len(data)
    second = MemoryFetcher({desc.digest: data}, chunk=65536)
    store = LocalStore(tmp_path / "c")  # a new process
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, second, bg, span=SPAN)
        await reader.prefetch(desc)
    assert store.path(desc.digest).read_bytes() == data
    assert sum(e - s for s, e in second.ranges) == len(data) - fetched_before


async def test_strict_serves_nothing_before_the_whole_blob_is_verified(store):
    data = random.randbytes(2 << 20)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536, pause=0.001)
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg, span=SPAN, strict=True)
        assert await reader.read(desc, 0, 100) == data[:100]
        assert reader.fetched(desc) == len(data), "the first byte was served only after the whole blob arrived"
        writer = store.active(desc.ref_key)
        assert store.path(desc.digest) is not None or writer.verified, "… and was verified"
    fetcher.corrupt.add(desc.digest)
    other = random.randbytes(1 << 20)
    bad = blob(other)
    fetcher.blobs[bad.digest] = other
    fetcher.corrupt = {bad.digest}
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg, span=SPAN, strict=True)
        with pytest.raises(DigestMismatch):
            await reader.read(bad, 0, 100)
    assert store.path(bad.digest) is None


async def test_corrupted_range_is_detected_at_completion_and_old_handles_fail(store):
    data = random.randbytes(2 << 20)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536)
    fetcher.corrupt.add(desc.digest)
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg, span=SPAN)
        handle = reader.open(desc, 1)
        assert await reader.read(desc, 0, 4096, handle) == data[:4096]  # served unverified
        with pytest.raises(DigestMismatch):
            for off in range(0, len(data), 131072):
                await reader.read(desc, off, 131072, handle)
        with pytest.raises(DigestMismatch, match="open it again"):
            await reader.read(desc, 0, 10, handle)
        fetcher.corrupt.clear()
        fresh = reader.open(desc, 1)
        assert await reader.read(desc, len(data) - 10, 10, fresh) == data[-10:]
        assert store.path(desc.digest) is None or store.path(desc.digest).read_bytes() == data
