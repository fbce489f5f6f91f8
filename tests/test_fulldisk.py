"""A full disk during a fetch: the reader gets EIO (or ENOSPC), the mount lives on, the store stays
consistent. The cache is a 2 MiB tmpfs; the layer read is 3 MiB.

A disk that refuses only the commit (the fsync, the labels) is tested in-process: tmpfs never fails
an fsync, so the refusal is made by replacing it."""

import errno
import hashlib
import logging
import os
import random
import subprocess

import pytest
import trio

from imagefs.content import LocalStore
from imagefs.errors import DigestMismatch, StorageError
from imagefs.handlers import fetch
from imagefs.reader import BlobReader
from tests.support.mounting import Mount
from tests.test_handlers import MemoryFetcher, blob

AMD64 = ("--platform", "linux/amd64")


@pytest.fixture
def small_cache(tmp_path):
    # root, like the whole suite (FUSE); a non-root run fails here loudly rather than skipping
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        yield disk / "cache"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def read_errno(path) -> int | None:
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError as exc:
        return exc.errno
    return None


def test_full_disk_gives_eio_and_the_mount_lives_on(proxy, images, small_cache, tmp_path):
    """Found by this test: the progress record (``state``) and the unmount's ``suspend`` wrote to the
    full disk unguarded, and the ENOSPC ended the whole mount (ENOTCONN for every reader)."""
    big = images.shared  # 3 MiB of random data: cannot fit
    small = images.amd.layers[-1]
    with Mount(f"{proxy.host}/test/oci:v1", tmp_path / "m", small_cache, *AMD64) as m:
        assert m.path(f"layer-{small.digest}", "blob").read_bytes() == small.data
        assert read_errno(m.path(f"layer-{big.digest}", "blob")) in (errno.EIO, errno.ENOSPC)
        # still serving: a listing, a committed manifest, a committed layer
        assert f"layer-{big.digest}" in os.listdir(m.mountpoint)
        assert m.path("root", "blob").read_bytes() == images.oci.index.data
        assert m.path(f"layer-{small.digest}", "blob").read_bytes() == small.data
        assert "No space left on device" in m.log_text()
    # nothing partial or corrupt was committed
    blobs = small_cache / "blobs" / "sha256"
    for f in blobs.iterdir():
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
    assert not (blobs / big.digest[7:]).exists()
    assert "unmounted" in m.log_text(), "the mount ended cleanly, not by a crash"


# -- a disk that refuses the commit, in-process: not a failed verification ---------------------------

def _refuse_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def _refuse_xattrs(monkeypatch):
    def setxattr(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "setxattr", setxattr)


@pytest.mark.parametrize("refuse", [_refuse_fsync, _refuse_xattrs], ids=["enospc-on-fsync", "xattr-failure"])
async def test_a_commit_the_disk_refuses_keeps_verified_data(tmp_path, monkeypatch, caplog, refuse):
    """ENOSPC at fsync or a failing xattr is no digest mismatch: the verified bytes go on being
    served from the ingest, nothing is counted or logged as a failed verification, and the next
    process commits them without fetching a byte again."""
    data = random.randbytes(1 << 20)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536)
    refuse(monkeypatch)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as bg:
        reader = BlobReader(LocalStore(tmp_path / "c"), fetcher, bg)
        handle = reader.open(desc, 1)
        out = bytearray()
        for off in range(0, len(data), 131072):
            out += await reader.read(desc, off, 131072, handle)
        assert bytes(out) == data
        assert await reader.read(desc, 5, 10, handle) == data[5:15], "old handles keep reading"
        assert await reader.read(desc, 0, 10, reader.open(desc, 1)) == data[:10], "and new ones"
        with pytest.raises(StorageError, match="cannot be committed"):
            await reader.prefetch(desc)  # asked to commit it, it says why it cannot
        reader.close()
    assert reader.statistics().verify_failures == 0
    assert "failed verification" not in caplog.text and "discarded" not in caplog.text
    assert "not committed" in caplog.text
    assert LocalStore(tmp_path / "c").path(desc.digest) is None
    monkeypatch.undo()  # the disk has room again: the next process resumes and commits

    fetched = len(fetcher.opens)
    store = LocalStore(tmp_path / "c")
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg)
        await reader.prefetch(desc)
    assert store.path(desc.digest).read_bytes() == data
    assert len(fetcher.opens) == fetched, "the verified ingest was kept: nothing fetched again"


async def test_a_digest_mismatch_is_still_discarded(tmp_path):
    data = random.randbytes(300_000)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536)
    fetcher.corrupt.add(desc.digest)
    store = LocalStore(tmp_path / "c")
    async with trio.open_nursery() as bg:
        reader = BlobReader(store, fetcher, bg)
        with pytest.raises(DigestMismatch):
            await reader.prefetch(desc)
    assert reader.statistics().verify_failures == 1
    assert not (store.ingests / desc.ref_key).exists()


async def test_a_whole_blob_fetch_keeps_what_the_disk_would_not_commit(tmp_path, monkeypatch):
    """The fetch handler's path (configs, manifests, ``--prefetch`` of pull): the same rule."""
    data = random.randbytes(200_000)
    desc = blob(data)
    fetcher = MemoryFetcher({desc.digest: data}, chunk=65536)
    store = LocalStore(tmp_path / "c")
    _refuse_fsync(monkeypatch)
    with pytest.raises(StorageError, match="No space left on device"):
        await fetch(store, fetcher, desc)
    assert store.path(desc.digest) is None and store.active(desc.ref_key) is None
    monkeypatch.undo()
    await fetch(LocalStore(tmp_path / "c"), fetcher, desc)
    assert store.path(desc.digest).read_bytes() == data
    assert fetcher.opens == [desc.digest], "fetched once: the verified ingest was kept"
