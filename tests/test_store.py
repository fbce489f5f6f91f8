"""The content store's contract (DESIGN.md §3), run against the local store."""

import hashlib
import os

import pytest

from imagefs.content import LocalStore
from imagefs.errors import AlreadyExists, DigestMismatch, Unavailable

DATA = b"some blob bytes" * 100
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
REF = f"layer-{DIGEST}"


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "cache")


async def test_one_writer_per_ref(store):
    w = store.writer(REF, len(DATA), DIGEST)
    with pytest.raises(Unavailable, match=rf"ref {REF} locked for \d+\.\ds"):
        store.writer(REF, len(DATA), DIGEST)
    assert store.active(REF) is w
    with w:
        await w.write(DATA[:10])
        await w.write(DATA[10:])
        assert w.pread(5, 10) == DATA[5:15]
        path = await w.commit({"containerd.io/gc.root": "2026-01-01T00:00:00Z"})
    assert path.read_bytes() == DATA
    assert os.stat(path).st_mode & 0o777 == 0o444
    assert store.active(REF) is None
    with pytest.raises(AlreadyExists):
        store.writer(REF, len(DATA), DIGEST)
    assert not (store.ingests / REF).exists()


async def test_commit_refuses_wrong_bytes_and_keeps_nothing(store):
    bad = bytearray(DATA)
    bad[7] ^= 1
    w = store.writer(REF, len(DATA), DIGEST)
    with pytest.raises(DigestMismatch, match="expected"):
        with w:
            await w.write(bytes(bad))
            await w.commit()
    assert store.path(DIGEST) is None
    assert store.active(REF) is None, "the lock is released after a failed commit"
    assert isinstance(w.error, DigestMismatch)
    assert not (store.ingests / REF).exists()
    # and the next writer can try again
    with store.writer(REF, len(DATA), DIGEST) as w2:
        await w2.write(DATA)
        await w2.commit()
    assert store.path(DIGEST).read_bytes() == DATA


async def test_short_and_long_content_refused(store):
    with pytest.raises(DigestMismatch, match="got 3 bytes"):
        with store.writer(REF, len(DATA), DIGEST) as w:
            await w.write(b"abc")
            await w.commit()
    with pytest.raises(DigestMismatch, match="more than"):
        with store.writer(REF, len(DATA), DIGEST) as w:
            await w.write(DATA + b"x")
    assert store.path(DIGEST) is None


async def test_labels_are_user_xattrs_on_the_blob(store):
    with store.writer(REF, len(DATA), DIGEST) as w:
        await w.write(DATA)
        path = await w.commit({"containerd.io/gc.ref.content.0": DIGEST})
    assert os.getxattr(path, "user.containerd.io/gc.ref.content.0") == DIGEST.encode()
    store.update_labels(DIGEST, {"containerd.io/gc.root": "t"})
    assert store.labels(DIGEST) == {"containerd.io/gc.ref.content.0": DIGEST, "containerd.io/gc.root": "t"}
    assert store.info(DIGEST).size == len(DATA)


def test_tag_memory(store):
    assert store.recall_tag("127.0.0.1:5000/a/b", "v1") is None
    store.remember_tag("127.0.0.1:5000/a/b", "v1", {"digest": DIGEST})
    desc, when = store.recall_tag("127.0.0.1:5000/a/b", "v1")
    assert desc == {"digest": DIGEST} and when.endswith("Z")


async def test_crashed_ingest_is_started_over(store):
    stale = store.ingests / REF
    stale.mkdir(parents=True)
    (stale / "data").write_bytes(b"garbage from a crash")
    with store.writer(REF, len(DATA), DIGEST) as w:
        await w.write(DATA)
        await w.commit()
    assert store.path(DIGEST).read_bytes() == DATA
