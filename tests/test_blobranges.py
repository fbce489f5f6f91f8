"""The one entry for blob bytes (imagefs.blobranges): whole pieces, and plain-tar members with readahead.

In-process, against the local store and an in-memory fetcher (tests/test_handlers.py's), so the
requests each read costs can be counted exactly.
"""

import hashlib
import mmap
import random
import time

import pytest
import trio

from imagefs import descriptors as d
from imagefs.blobranges import BLOB, KEPT, REGISTRY, Piece
from imagefs.content import LocalStore
from imagefs.content.pieces import Pieces
from imagefs.errors import DigestMismatch
from imagefs.layers.service import Layers
from imagefs.reader import BlobReader
from imagefs.testing import images as im

from .test_handlers import MemoryFetcher

SPAN = 256 << 10


def layer_desc(data: bytes, mt=d.OCI_LAYER) -> d.Descriptor:
    return d.Descriptor(mt, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


async def test_span_is_checked_kept_and_never_kept_wrong(tmp_path):
    data = random.randbytes(300_000)
    desc = layer_desc(data)
    store = LocalStore(tmp_path / "cache")
    fetcher = MemoryFetcher({desc.digest: data}, chunk=1000)  # it does not clip a last chunk
    pieces = Pieces(tmp_path / "cache", desc.digest)
    start, end = 1000, 101_000
    good = hashlib.sha256(data[start:end]).hexdigest()
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg)
        with pytest.raises(DigestMismatch, match="span refused"):
            await reader.span(desc, start, end, Piece("0" * 64, "span refused"), pieces)
        assert pieces.get("0" * 64) is None and not list(pieces.dir.glob("*")), "a wrong piece was kept"

        got = await reader.span(desc, start, end, Piece(good, "span refused"), pieces)
        assert (got.data, got.source) == (data[start:end], REGISTRY)
        asked = len(fetcher.ranges)
        again = await reader.span(desc, start, end, Piece(good, "span refused"), pieces)
        assert (again.data, again.source) == (data[start:end], KEPT)
        assert len(fetcher.ranges) == asked, "a kept piece cost a request"

        decoded = await reader.span(desc, start, end, Piece(hashlib.sha256(b"x" + data[start:end]).hexdigest(), "no",
                                                            lambda b: b"x" + b), pieces)
        assert decoded.data == b"x" + data[start:end]

        await reader.prefetch(desc)
        asked = len(fetcher.ranges)
        here = await reader.span(desc, start, end, Piece(good, "span refused"), pieces)
        assert (here.data, here.source) == (data[start:end], BLOB)
        with pytest.raises(DigestMismatch):  # the committed blob's bytes are checked too
            await reader.span(desc, start, end, Piece("1" * 64, "span refused"), pieces)
        assert len(fetcher.ranges) == asked
        bg.cancel_scope.cancel()


async def test_plain_tar_member_read_in_order_gets_readahead_stopped_at_its_end(tmp_path):
    big = random.randbytes(12 << 20)
    blob = im.tar_layer({"a/small": b"small file\n", "a/big": big, "z/after": random.randbytes(8 << 20)},
                        compression="none")
    desc = layer_desc(blob.data)
    cache = tmp_path / "cache"
    async with trio.open_nursery() as bg:  # index the layer once, then forget the blob
        layers = Layers(BlobReader(LocalStore(cache), MemoryFetcher({desc.digest: blob.data}), bg), cache_dir=cache)
        entries = {e.path: e for e in (await layers.index(desc)).entries}
        bg.cancel_scope.cancel()
    assert LocalStore(cache).delete(desc.digest)

    for with_handle in (True, False):
        fetcher = MemoryFetcher({desc.digest: blob.data}, chunk=65536)
        async with trio.open_nursery() as bg:
            reader = BlobReader(LocalStore(tmp_path / f"c{with_handle}"), fetcher, bg, span=SPAN)
            layers = Layers(reader, cache_dir=cache)
            entry = entries["a/big"]
            handle = layers.open(desc, entry, 7) if with_handle else None
            got = bytearray()
            while len(got) < entry.size:  # the kernel's 128 KiB reads
                got += await layers.read(desc, entry, len(got), 128 << 10, handle)
            assert got == big
            requests = reader.statistics().requests
            # without readahead: one request per 256 KiB span (48 of them)
            assert requests <= 8, fetcher.ranges
            member_end = entry.offset + entry.size
            assert max(e for _, e in fetcher.ranges) <= -(-member_end // SPAN) * SPAN, "readahead ran past the member"
            if with_handle:  # the member starts anywhere; the requests after the first start on a page
                assert all(s % 4096 == 0 for s, _ in fetcher.ranges[1:] if s != member_end), fetcher.ranges
            bg.cancel_scope.cancel()

    fetcher = MemoryFetcher({desc.digest: blob.data}, chunk=65536)
    async with trio.open_nursery() as bg:  # a small file costs a span, not a window
        reader = BlobReader(LocalStore(tmp_path / "small"), fetcher, bg, span=SPAN)
        layers = Layers(reader, cache_dir=cache)
        small = entries["a/small"]
        assert await layers.read(desc, small, 0, 4096, layers.open(desc, small, 8)) == b"small file\n"
        assert sum(e - s for s, e in fetcher.ranges) <= SPAN
        bg.cancel_scope.cancel()


async def test_bytes_landed_ahead_are_hashed_from_memory_not_read_back(tmp_path):
    """A sequential reader's next request lands ahead of the hashed prefix: those bytes are
    hashed once the prefix reaches them, without reading the ingest back — unless they did not
    fit in the hold, and a wrong byte is still a mismatch either way."""
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    chunk = 256 << 10
    with store.writer("layer-a", len(data), digest) as w:
        for off in range(len(data) // 2, len(data), chunk):  # the second half first
            await w.write_at(off, data[off : off + chunk])
        for off in range(0, len(data) // 2, chunk):
            await w.write_at(off, data[off : off + chunk])
        await w.commit()
    assert store.statistics().bytes_read_back == 0
    assert store.path(digest) is not None

    bad = bytearray(data)
    bad[-1] ^= 1
    wrong = "sha256:" + hashlib.sha256(data + b"x").hexdigest()  # never the digest committed above, nor bad's
    with store.writer("layer-b", len(bad), wrong) as w:
        for off in range(len(bad) // 2, len(bad), chunk):
            await w.write_at(off, bytes(bad[off : off + chunk]))
        for off in range(0, len(bad) // 2, chunk):
            await w.write_at(off, bytes(bad[off : off + chunk]))
        with pytest.raises(DigestMismatch):
            await w.verify()
    assert store.statistics().bytes_read_back == 0


async def test_a_blob_larger_than_the_hold_is_hashed_once_from_memory(tmp_path, monkeypatch):
    """The hasher runs beside the writes, from memory: a write that would pass the hold waits for
    it rather than being read back later. Written in order, or as a sequential reader's current
    request and its next one (started once the current one has less than the hold left), a blob
    twice the hold's size is hashed with nothing read back, and the hold never passes HOLD."""
    from imagefs.content import ingest
    from imagefs.content.ingest import HOLD

    def slow_hash(hasher, pos, chunks):  # a hasher slower than the disk: writes must wait for it
        time.sleep(0.004 * len(chunks))
        return hash_all(hasher, pos, chunks)

    hash_all = ingest.hash_chunks
    monkeypatch.setattr(ingest, "hash_chunks", slow_hash)
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(2 * HOLD + (5 << 20))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    chunk, split = 1 << 20, HOLD + (8 << 20)
    peak = 0

    async def land(w, off: int, end: int) -> None:
        nonlocal peak
        await w.write_at(off, data[off : min(end, off + chunk)])
        peak = max(peak, w.held.for_hash)

    with store.writer("layer-d", len(data), digest) as w:  # in order, as fast as the disk takes it
        for off in range(0, len(data), chunk):
            await land(w, off, len(data))
        await w.commit()
    second_store = LocalStore(tmp_path / "cache2")
    with second_store.writer("layer-e", len(data), digest) as w:  # two requests, the second one ahead
        first, second = range(0, split, chunk), range(split, len(data), chunk)
        for off in first:
            await land(w, off, split)
            if split - off <= HOLD - (4 << 20) and second:  # a request's pace: bounded by what is in flight
                await land(w, second[0], len(data))
                second = second[1:]
        for off in second:
            await land(w, off, len(data))
        await w.commit()
    assert store.statistics().bytes_read_back == second_store.statistics().bytes_read_back == 0
    assert peak <= HOLD
    assert store.path(digest) is not None and second_store.path(digest) is not None


async def test_a_resumed_ingest_is_read_back_to_be_hashed(tmp_path):
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(1 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    w = store.writer("layer-c", len(data), digest)
    await w.write_at(len(data) // 2, data[len(data) // 2 :])
    w.suspend()
    with LocalStore(tmp_path / "cache").writer("layer-c", len(data), digest) as w2:  # a later process
        await w2.write_at(0, data[: len(data) // 2])
        await w2.commit()
        assert w2.store.statistics().bytes_read_back == len(data) // 2


async def test_a_read_inside_the_chunk_just_landed_is_answered_from_it(tmp_path):
    """A chunk as the direct path lands it (a page-aligned map) is kept until read: a read inside
    it is a view of it, no pread and no copy; one across two chunks is joined from both."""
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(1 << 20)
    with store.writer("layer-d", len(data), "sha256:" + hashlib.sha256(data).hexdigest()) as w:
        for off in (0, 512 << 10):
            chunk = memoryview(mmap.mmap(-1, 512 << 10))
            chunk[:] = data[off : off + (512 << 10)]
            await w.write_at(off, chunk)
        got = await w.read(600 << 10, 4096)
        assert isinstance(got, memoryview) and got == data[600 << 10 : (600 << 10) + 4096]  # no pread, no copy
        across = await w.read((512 << 10) - 100, 200)
        assert bytes(across) == data[(512 << 10) - 100 : (512 << 10) + 100]
        assert store.statistics().bytes_served_from_memory == 4096 + 200
        await w.commit()
