"""One conformance suite for content stores, after containerd's ``core/content/testsuite``.

Every test takes a store from the ``store`` fixture and uses only what the capabilities of
:mod:`imagefs.content.store` name (Provider, Ingester, Writer, Manager, Tags), so any store can be
checked by adding a factory to ``STORES``. Today: the local store, with labels as user xattrs, and
the same store on a filesystem without user xattrs (labels in sidecar files).
"""

import errno
import hashlib
import inspect
import os
import random

import pytest
import trio

from imagefs.content import LocalStore, store as capabilities
from imagefs.errors import AlreadyExists, DigestMismatch, NotFound, Unavailable

DATA = random.Random(12).randbytes(300_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
REF = f"layer-{DIGEST}"
ROOT_LABEL = "containerd.io/gc.root"


def local(tmp_path, monkeypatch):
    return LocalStore(tmp_path / "cache")


def local_sidecar_labels(tmp_path, monkeypatch):
    def no_user_xattrs(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", no_user_xattrs)
    return LocalStore(tmp_path / "cache")


STORES = [local, local_sidecar_labels]


@pytest.fixture(params=STORES, ids=lambda f: f.__name__)
def store(request, tmp_path, monkeypatch) -> capabilities.Store:
    return request.param(tmp_path, monkeypatch)


async def ingest(store: capabilities.Store, data: bytes = DATA, labels: dict | None = None, *, digest: str = DIGEST):
    """Write ``data`` in three out-of-order pieces and commit it."""
    third = len(data) // 3
    with store.writer(REF, len(DATA), digest) as w:
        for start, end in ((third, 2 * third), (0, third), (2 * third, len(data))):
            await w.write_at(start, data[start:end])
        return await w.commit(labels)


# -- the shape ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [capabilities.Provider, capabilities.Ingester, capabilities.Manager,
                                      capabilities.Tags])
def test_store_has_every_member_its_capabilities_name(store, protocol):
    for name, member in vars(protocol).items():
        if callable(member) and not name.startswith("_"):
            assert callable(getattr(store, name, None)), f"{type(store).__name__} has no {name}"


async def test_writer_has_every_member_the_protocol_names(store):
    with store.writer(REF, len(DATA), DIGEST) as w:
        for name, member in vars(capabilities.Writer).items():
            if name.startswith("_") and name not in ("__enter__", "__exit__"):
                continue
            if callable(member) or isinstance(member, property):
                assert hasattr(w, name), f"{type(w).__name__} has no {name}"
        for name in inspect.get_annotations(capabilities.Writer):
            assert hasattr(w, name), f"{type(w).__name__} has no {name}"
        assert (w.ref, w.size, w.digest) == (REF, len(DATA), DIGEST)


# -- Ingester: one writer per ref -----------------------------------------------------------------


async def test_second_writer_of_a_ref_is_unavailable_and_says_who_holds_it(store):
    with store.writer(REF, len(DATA), DIGEST) as w:
        with pytest.raises(Unavailable, match=REF):
            store.writer(REF, len(DATA), DIGEST)
        assert store.active(REF) is w
    assert store.active(REF) is None
    store.writer(REF, len(DATA), DIGEST).abort(RuntimeError("test"))  # free again once released


async def test_committed_content_already_exists(store):
    await ingest(store)
    with pytest.raises(AlreadyExists):
        store.writer(REF, len(DATA), DIGEST)
    with pytest.raises(AlreadyExists):  # whatever ref names the same digest
        store.writer(f"config-{DIGEST}", len(DATA), DIGEST)


# -- Writer: commit checks size and digest --------------------------------------------------------


async def test_commit_checks_the_digest_and_discards_a_mismatch(store):
    bad = bytearray(DATA)
    bad[1234] ^= 1
    with pytest.raises(DigestMismatch):
        await ingest(store, bytes(bad))
    assert store.path(DIGEST) is None and store.info(DIGEST) is None
    assert store.active(REF) is None
    with store.writer(REF, len(DATA), DIGEST) as w:
        assert w.present.total() == 0, "a mismatch leaves nothing to resume"
        w.abort(RuntimeError("test"))


async def test_commit_checks_the_size(store):
    with pytest.raises(DigestMismatch):
        with store.writer(REF, len(DATA), DIGEST) as w:
            await w.write_at(0, DATA[:-1])
            assert not w.complete
            await w.commit()
    with pytest.raises(DigestMismatch):
        with store.writer(REF, len(DATA), DIGEST) as w:
            await w.write_at(0, DATA + b"x")
    assert store.path(DIGEST) is None


async def test_a_wrong_digest_for_the_right_bytes_is_refused(store):
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch):
        await ingest(store, digest=wrong)
    assert store.path(wrong) is None and store.path(DIGEST) is None


async def test_verified_then_committed(store):
    with store.writer(REF, len(DATA), DIGEST) as w:
        await w.write_at(0, DATA)
        assert w.complete and not w.verified
        await w.verify()
        assert w.verified and not w.committed
        assert w.pread(10, 20) == DATA[10:30], "verified bytes can be served before the commit"
        await w.commit()
        assert w.committed and w.closed
    assert store.path(DIGEST).read_bytes() == DATA


async def test_leaving_the_writer_without_commit_discards_unverified_data(store):
    with pytest.raises(RuntimeError):
        with store.writer(REF, len(DATA), DIGEST) as w:
            await w.write_at(0, DATA[:1000])
            raise RuntimeError("fetch failed")
    with store.writer(REF, len(DATA), DIGEST) as w:
        assert w.present.total() == 0
        w.abort(RuntimeError("test"))


async def test_leaving_the_writer_after_verification_keeps_the_data(store):
    """A failure after the bytes were verified (the disk refused the commit) is no reason to fetch
    them again: the next writer of the ref starts complete."""
    with pytest.raises(RuntimeError):
        with store.writer(REF, len(DATA), DIGEST) as w:
            await w.write_at(0, DATA)
            await w.verify()
            raise RuntimeError("commit refused")
    assert store.path(DIGEST) is None and store.active(REF) is None
    with store.writer(REF, len(DATA), DIGEST) as w:
        assert w.complete
        await w.commit()
    assert store.read(DIGEST) == DATA


# -- Writer: progress and resume ------------------------------------------------------------------


async def test_readers_follow_the_writer(store):
    with store.writer(REF, len(DATA), DIGEST) as w:
        woken = []

        async def follow():
            await w.wait_changed()
            woken.append(w.present.ranges())

        async with trio.open_nursery() as n:
            n.start_soon(follow)
            await trio.sleep(0.01)
            await w.write_at(100, DATA[100:200])
        assert woken == [[(100, 200)]]
        assert store.active(REF).present.covers(100, 200)
        assert w.offset == 0, "the prefix starts at 0"
        w.abort(RuntimeError("test"))


async def test_a_suspended_ingest_resumes_in_the_next_writer(store):
    half = len(DATA) // 2
    with store.writer(REF, len(DATA), DIGEST) as w:
        await w.write_at(0, DATA[:half])
        w.suspend()
        assert w.closed
    assert store.active(REF) is None
    with store.writer(REF, len(DATA), DIGEST) as w:
        assert w.offset == half and w.present.covers(0, half)
        assert w.pread(0, 10) == DATA[:10]
        await w.write_at(half, DATA[half:])
        await w.commit()
    assert store.path(DIGEST).read_bytes() == DATA


async def test_an_ingest_of_another_blob_is_not_resumed(store):
    other = b"y" * len(DATA)
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    with store.writer(REF, len(DATA), other_digest) as w:
        await w.write_at(0, other[:5000])
        w.suspend()
    with store.writer(REF, len(DATA), DIGEST) as w:
        assert w.present.total() == 0, "same ref, another digest: start over"
        w.abort(RuntimeError("test"))


# -- Manager: info, labels, delete ----------------------------------------------------------------


async def test_info_of_committed_content(store):
    assert store.info(DIGEST) is None
    await ingest(store, labels={"imagefs.mediatype": "application/octet-stream"})
    info = store.info(DIGEST)
    assert (info.digest, info.size) == (DIGEST, len(DATA))
    assert info.labels == {"imagefs.mediatype": "application/octet-stream"}


async def test_labels_are_added_replaced_and_removed(store):
    await ingest(store, labels={ROOT_LABEL: "2026-01-01T00:00:00Z", "containerd.io/gc.ref.content.0": DIGEST})
    store.update_labels(DIGEST, {ROOT_LABEL: "2026-02-02T00:00:00Z", "imagefs.mediatype": "x"})
    assert store.labels(DIGEST) == {ROOT_LABEL: "2026-02-02T00:00:00Z", "containerd.io/gc.ref.content.0": DIGEST,
                                    "imagefs.mediatype": "x"}
    store.remove_labels(DIGEST, [ROOT_LABEL])
    assert ROOT_LABEL not in store.labels(DIGEST)
    assert store.info(DIGEST).labels == store.labels(DIGEST)


async def test_delete(store):
    await ingest(store, labels={ROOT_LABEL: "t"})
    assert store.delete(DIGEST) is True
    assert store.path(DIGEST) is None and store.info(DIGEST) is None
    with pytest.raises(NotFound):
        store.read(DIGEST)
    assert store.delete(DIGEST) is False
    await ingest(store)  # and it can be fetched again, without its old labels
    assert store.labels(DIGEST) == {}


# -- Provider ---------------------------------------------------------------------------------------


async def test_provider_reads_committed_content_only(store):
    with pytest.raises(NotFound):
        store.read(DIGEST)
    with store.writer(REF, len(DATA), DIGEST) as w:
        await w.write_at(0, DATA)
        await w.verify()
        assert store.path(DIGEST) is None, "verified is not committed"
        await w.commit()
    assert store.read(DIGEST) == DATA
    assert store.path(DIGEST).read_bytes() == DATA


# -- Tags -------------------------------------------------------------------------------------------


def test_tags_are_remembered_and_forgotten(store):
    name = "127.0.0.1:5000/a/b"
    assert store.recall_tag(name, "v1") is None
    store.remember_tag(name, "v1", {"digest": DIGEST})
    desc, when = store.recall_tag(name, "v1")
    assert desc == {"digest": DIGEST} and when.endswith("Z")
    assert store.forget_tag(name, "v1") is True
    assert store.recall_tag(name, "v1") is None and store.forget_tag(name, "v1") is False

