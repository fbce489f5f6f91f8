"""Chunks an ingest keeps in memory (imagefs/content/held.py), and the ingest writing page-aligned
chunks past the page cache (O_DIRECT) on a real ext4 or tmpfs directory.

What must hold: a reader is served the right bytes wherever they are (a chunk in memory, the page
cache, only the disk); a chunk written past the page cache stays in memory until a read reaches
its end, within its budget; the hasher's hold and the readers' keep are counted apart; a
filesystem without O_DIRECT (tmpfs) or an unaligned chunk is written the usual way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import trio

from imagefs.content import diskio
from imagefs.content.held import Budget, Held
from imagefs.content.local import LocalStore
from imagefs.errors import StorageError

MiB = 1 << 20


def pooled(data: bytes) -> memoryview:
    """A chunk as the direct path hands it out: a view of a page-aligned map."""
    m = mmap.mmap(-1, len(data))
    m[:] = data
    return memoryview(m)


def test_a_chunk_is_served_whole_or_across_its_neighbours_and_let_go_when_read():
    held = Held(hold=8 * MiB, keep=Budget(8 * MiB))
    a, b = random.randbytes(MiB), random.randbytes(MiB)
    held.add(0, a, hashing=True, reading=True)
    held.add(MiB, b, hashing=True, reading=True)
    [inside] = held.pieces(100, 4096)
    assert isinstance(inside, memoryview) and inside == a[100:4196]
    assert b"".join(held.pieces(MiB - 10, 20)) == a[-10:] + b[:10]  # across two chunks
    assert held.for_readers == MiB, "the read reached a's end: no longer kept for readers"
    assert held.starts(0), "...but still held for the hasher"
    held.hashed_to(MiB)
    assert not held.starts(0) and held.uncached.covers(0, MiB), "hashed and read: only the disk has it"
    assert held.pieces(0, 10) == [(0, 10)], "a part memory does not hold: the disk has it"
    assert [bytes(p) if isinstance(p, memoryview) else p for p in held.pieces(MiB - 5, 10)] == [(MiB - 5, 5), b[:5]]
    assert held.starts(MiB) and held.for_hash == MiB


def test_a_chunk_kept_for_readers_outlives_the_hasher_until_it_is_read():
    held = Held(hold=8 * MiB, keep=Budget(8 * MiB))
    chunk = random.randbytes(MiB)
    held.add(0, chunk, hashing=True, reading=True)
    assert held.chain(0) == [chunk]
    held.hashed_to(MiB)
    assert held.for_hash == 0 and held.for_readers == MiB
    assert held.pieces(0, MiB) == [chunk]  # a reader still finds it
    assert held.for_readers == 0 and not held.starts(0)


def test_budgets_are_counted_apart_and_a_chunk_for_no_one_is_not_kept():
    held = Held(hold=2 * MiB, keep=Budget(MiB))
    held.add(0, bytes(MiB), hashing=True, reading=False)  # buffered: the hasher's only
    held.add(MiB, bytes(MiB), hashing=False, reading=True)  # past the hold, but written direct
    assert held.for_hash == MiB and held.for_readers == MiB
    assert held.may_hold(MiB) and not held.may_hold(MiB + 1) and not held.may_keep(1)
    held.add(2 * MiB, bytes(MiB), hashing=False, reading=False)
    assert not held.starts(2 * MiB)
    held.hashed_to(MiB)
    assert not held.starts(0) and held.starts(MiB), "the hasher's chunk goes, the readers' stays"
    assert held.next_start(0) == MiB and held.next_start(MiB) is None
    held.clear()
    assert held.uncached.covers(MiB, 2 * MiB), "unread when the writer stopped: only the disk has it"
    assert held.pieces(MiB, 10) == [(MiB, 10)] and held.for_readers == held.for_hash == held.keep.used == 0


def test_a_chunk_on_its_way_to_the_disk_stays_until_written_or_forgotten():
    held = Held(hold=8 * MiB, keep=Budget(8 * MiB))
    a, b = random.randbytes(MiB), random.randbytes(MiB)
    held.add(0, a, hashing=False, reading=True, writing=True)
    held.add(MiB, b, hashing=True, reading=True, writing=True)
    assert b"".join(held.pieces(0, MiB)) == a and held.for_readers == MiB
    assert held.starts(0), "read, but its write is in flight: memory is the only copy"
    held.written(0)
    assert not held.starts(0)
    held.forget(MiB)  # its write failed
    assert not held.starts(MiB) and held.for_hash == held.for_readers == held.keep.used == 0


async def test_the_readers_budget_is_the_process_s_not_a_blob_s(tmp_path):
    """Two blobs streamed at once share one budget: the second's chunk past it takes the page cache."""
    store = LocalStore(tmp_path / "cache")
    store.kept.limit = 3 * MiB
    one, two = random.randbytes(2 * MiB), random.randbytes(2 * MiB)
    with store.writer("layer-one", len(one), "sha256:" + hashlib.sha256(one).hexdigest()) as a, \
            store.writer("layer-two", len(two), "sha256:" + hashlib.sha256(two).hexdigest()) as b:
        await a.write_at(0, pooled(one))
        await b.write_at(0, pooled(two[:MiB]))
        await b.write_at(MiB, pooled(two[MiB:]))
        await a.drain()
        await b.drain()
        assert store.statistics().bytes_written_direct == 3 * MiB and store.kept.used == 3 * MiB
        assert bytes(await a.read(0, 2 * MiB)) == one and store.kept.used == MiB, "read: let go"
        assert bytes(await b.read(0, 2 * MiB)) == two and store.kept.used == 0
        await a.commit()
        await b.commit()


async def read_all(w, size: int, step: int) -> bytes:
    out = []
    for off in range(0, size, step):
        out.append(bytes(await w.read(off, min(step, size - off))))
    return b"".join(out)


async def test_aligned_chunks_go_past_the_page_cache_and_readers_get_them_from_memory(tmp_path):
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(6 * MiB + 12345)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with store.writer("layer-direct", len(data), digest) as w:
        assert w.direct_fd >= 0, "ext4 takes O_DIRECT"
        for off in range(0, len(data), 2 * MiB):
            piece = data[off : off + 2 * MiB]
            await w.write_at(off, pooled(piece) if len(piece) == 2 * MiB else piece)  # the tail: unaligned
        await w.drain()
        stats = store.statistics()
        assert stats.bytes_written_direct == 6 * MiB
        assert await read_all(w, len(data), 768 << 10) == data
        stats = store.statistics()
        assert stats.bytes_served_from_memory >= 6 * MiB and stats.bytes_served_from_disk == 0
        assert w.held.for_readers == 0, "each chunk let go once read to its end"
        await w.hash_prefix()
        assert await read_all(w, 6 * MiB, MiB) == data[: 6 * MiB], "a second reader: from the disk"
        assert store.statistics().bytes_served_from_disk == 6 * MiB
        path = await w.commit()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest.split(":")[1]
    assert store.statistics().bytes_read_back == 0


async def test_no_o_direct_or_no_alignment_means_the_usual_buffered_write(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("the CI machine has /dev/shm (tmpfs)")
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        store = LocalStore(root / "cache")
        data = random.randbytes(4 * MiB)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with store.writer("layer-tmpfs", len(data), digest) as w:
            direct = w.direct_fd >= 0
            await w.write_at(0, pooled(data[: 2 * MiB]))
            await w.write_at(2 * MiB, pooled(data[2 * MiB :])[0:])
            await w.drain()
            assert bytes(await w.read(0, len(data))) == data
            await w.commit()
        # tmpfs may or may not take O_DIRECT (Linux >= 6.6 does): either way the bytes are right,
        # and what went direct is counted as such
        assert (store.statistics().bytes_written_direct > 0) == direct
    finally:
        shutil.rmtree(root, ignore_errors=True)
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(2 * MiB)
    with store.writer("layer-odd", len(data), "sha256:" + hashlib.sha256(data).hexdigest()) as w:
        await w.write_at(0, pooled(data[:4096]))
        await w.write_at(4096, pooled(data[4096 : 4096 + 100]))  # unaligned length
        await w.write_at(4196, pooled(b"\0" * 4096 + data[4196:])[4096:])  # unaligned offset and memory
        await w.drain()
        assert store.statistics().bytes_written_direct == 4096
        assert bytes(await w.read(0, len(data))) == data
        await w.commit()


async def test_a_device_that_refuses_the_alignment_gets_a_buffered_write(tmp_path, monkeypatch):
    real, refused = os.pwrite, []
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(MiB)
    with store.writer("layer-picky", len(data), "sha256:" + hashlib.sha256(data).hexdigest()) as w:

        def picky(fd, buf, offset):  # what the kernel answers when the device wants more alignment
            if fd == w.direct_fd:
                refused.append(offset)
                raise OSError(22, "Invalid argument")
            return real(fd, buf, offset)

        monkeypatch.setattr(diskio.os, "pwrite", picky)
        await w.write_at(0, pooled(data))
        await w.drain()
        assert refused == [0] and store.statistics().bytes_written_direct == 0
        assert bytes(await w.read(0, len(data))) == data
        await w.commit()


async def test_a_write_behind_serves_readers_at_once_and_a_failed_one_is_fetched_again(tmp_path, monkeypatch):
    """A chunk written past the page cache is present, and served from memory, before its write
    ends; the state file records only what is on disk. A write the disk refuses takes its bytes
    out of ``present`` (a read fetches them again), fails the fetch's next write, and makes the
    commit a disk error, never a verification failure."""
    real, gate = diskio.land, trio.Event()
    token = None

    def slow_land(fd, direct_fd, data, offset):  # a worker thread: the disk is slow today
        trio.from_thread.run(gate.wait, trio_token=token)
        return real(fd, direct_fd, data, offset)

    token = trio.lowlevel.current_trio_token()
    monkeypatch.setattr(diskio, "land", slow_land)
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(2 * MiB)
    with store.writer("layer-behind", len(data), "sha256:" + hashlib.sha256(data).hexdigest()) as w:
        await w.write_at(0, pooled(data[:MiB]))
        assert w.present.covers(0, MiB) and bytes(await w.read(0, MiB)) == data[:MiB]
        w.save()
        assert json.loads(w.state_path.read_text())["present"] == [], "not on disk yet: not recorded"
        gate.set()
        await w.drain()
        w.save()
        assert json.loads(w.state_path.read_text())["present"] == [[0, MiB]]
        assert bytes(await w.read(0, MiB)) == data[:MiB], "let go from memory: read from the disk"

        def full(fd, direct_fd, buf, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(diskio, "land", full)
        await w.write_at(MiB, pooled(data[MiB:]))
        await w.drain()
        assert not w.present.covers(MiB, 2 * MiB) and not w.complete
        with pytest.raises(StorageError, match="No space left"):
            await w.write_at(MiB, pooled(data[MiB:]))
        with pytest.raises(StorageError, match="No space left"):
            await w.verify()
        assert store.statistics().verify_failures == 0
        monkeypatch.setattr(diskio, "land", real)
        await w.write_at(MiB, pooled(data[MiB:]))  # fetched again: the disk has room now
        await w.commit()


async def test_a_writer_closed_under_two_thread_ops_keeps_its_fd_until_the_last_ends(tmp_path, monkeypatch):
    """A disk read and a write in worker threads when the writer is aborted: the one that ends first
    must not close the descriptor under the other (it did: EBADF in a mount's log)."""
    store = LocalStore(tmp_path / "cache")
    data = random.randbytes(2 * MiB)
    reading, writing = threading.Event(), threading.Event()
    real_joined, real_land = diskio.joined, diskio.land

    def slow_joined(parts, fd):
        reading.wait(10)
        return real_joined(parts, fd)

    def slow_land(fd, direct_fd, buf, offset):
        writing.wait(10)
        return real_land(fd, direct_fd, buf, offset)

    w = store.writer("layer-ops", len(data), "sha256:" + hashlib.sha256(data).hexdigest())
    await w.write_at(0, pooled(data[:MiB]))
    await w.drain()
    assert bytes(await w.read(0, MiB)) == data[:MiB]  # read to its end: let go; only the disk has it now
    monkeypatch.setattr(diskio, "joined", slow_joined)
    monkeypatch.setattr(diskio, "land", slow_land)
    got, refused = [], []

    async def read():
        got.append(bytes(await w.read(0, MiB)))

    async def write():
        try:
            await w.write_at(MiB, data[MiB:])  # bytes: a buffered write in a worker thread
        except Exception as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)
        await trio.sleep(0.1)
        w.abort(StorageError("stopped"))
        writing.set()  # the write ends first...
        await trio.sleep(0.1)
        reading.set()  # ...and the read must still have its descriptor
    assert got == [data[:MiB]] and isinstance(refused[0], StorageError)
    assert w.fd == -1, "closed once the last one ended"
