"""zstd:chunked layers through real mounts: listed from their TOC, read frame by frame, all verified.

The layers are written by :mod:`imagefs.testing.zstdchunked` to containers/storage's format; the
mount is compared entry by entry with ``umoci unpack`` (the blob is a plain tar+zstd to ``skopeo``,
which recompresses it for umoci), and
its cost is counted at the proxy.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from imagefs.layers import toc
from imagefs.layers import zstdchunked as zreader
from imagefs.testing import images as im
from imagefs.testing.push import push
from imagefs.testing import zstdchunked
from tests.support.mounting import Mount
from tests.test_estargz import BIG, CHUNK, base_tar, upper_tar
from tests.test_rootfs import snapshot, unpack


def toc_of(blob: im.Blob) -> tuple[tuple[int, int, int], dict]:
    """Where the TOC is and what it says, read back by hand from the footer."""
    where = zreader.footer(blob.data[-zreader.TAIL:], blob.size)
    offset, clen, ulen = where
    return where, json.loads(zreader.read_toc(blob.data[offset:offset + clen], ulen, "test"))


def chunk_row(blob: im.Blob, name: str, pos: int) -> dict:
    _, doc = toc_of(blob)
    rows = [r for r in doc["entries"] if r["name"] == name and r.get("offset")]
    return max((r for r in rows if r.get("chunkOffset", 0) <= pos), key=lambda r: r.get("chunkOffset", 0))


class ZstdImages:
    def __init__(self, registry) -> None:
        host = registry.host
        self.base = zstdchunked.layer(base_tar(), chunk_size=CHUNK)
        self.upper = zstdchunked.layer(upper_tar())
        self.full = im.image([self.base, self.upper])
        push(host, "zstdchunked/full", self.full, "v1")
        self.wrong = zstdchunked.layer(base_tar(), chunk_size=CHUNK,
                                       annotations={zstdchunked.CHECKSUM_ANNOTATION: "sha256:" + "1" * 64})
        push(host, "zstdchunked/wrong", im.image([self.wrong]), "v1")
        self.bare = zstdchunked.layer(base_tar(), chunk_size=CHUNK, annotate=False)
        push(host, "zstdchunked/bare", im.image([self.bare]), "v1")


@pytest.fixture(scope="session")
def zimages(registry) -> ZstdImages:
    return ZstdImages(registry)


def test_rootfs_equals_umoci_unpack(registry, zimages, tmp_path, mnt, cache_dir):
    # umoci 0.4.7 reads no zstd: skopeo (Go's zstd, not ours) recompresses the layers to gzip for it
    want = snapshot(unpack(registry, "zstdchunked/full", tmp_path, "--dest-compress", "--dest-compress-format", "gzip"))
    with Mount(f"{registry.host}/zstdchunked/full:v1", mnt, cache_dir) as m:
        got = snapshot(m.path("rootfs"))
        assert os.getxattr(m.path("rootfs/caps"), "user.imagefs.test") == b"hello"
        log = m.log_text()
    assert "Traceback" not in log, log
    assert log.count("from its zstd:chunked TOC") == 2
    differ = sorted((k, got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    assert differ == []
    assert "keep" not in got and got["bin/busybox"][-1] == 3 and got["opt/big"][-2] == im.digest_of(BIG)[7:]


def test_listing_costs_one_range_and_a_read_only_its_frames(registry, proxy, zimages, mnt, cache_dir):
    layer = zimages.base
    (offset, clen, _), _ = toc_of(layer)
    with Mount(f"{proxy.host}/zstdchunked/full:v1", mnt, cache_dir) as m:
        root = m.path("rootfs")
        assert os.lstat(root / "opt/big").st_size == len(BIG)
        gets = proxy.gets(f"/blobs/{layer.digest}")
        assert len(gets) == 1 and "range" in gets[0].request_headers  # manifest-position: no footer request
        assert proxy.bytes_sent(layer.digest) == clen
        with open(root / "opt/big", "rb") as f:
            assert os.pread(f.fileno(), 4096, 5 * CHUNK + 7) == BIG[5 * CHUNK + 7:5 * CHUNK + 4103]
        row = chunk_row(layer, "./opt/big", 5 * CHUNK)
        assert proxy.bytes_sent(layer.digest) - clen == row["endOffset"] - row["offset"]
        assert not (cache_dir / "blobs" / "sha256" / layer.digest.partition(":")[2]).exists()


def test_corrupted_frame_is_eio(registry, proxy, zimages, mnt, cache_dir):
    layer = zimages.base
    row = chunk_row(layer, "./opt/big", 2 * CHUNK)
    with Mount(f"{proxy.host}/zstdchunked/full:v1", mnt, cache_dir) as m:
        big = m.path("rootfs/opt/big")
        fault = proxy.corrupt(layer.digest, offset=row["offset"] + 1000)
        with open(big, "rb") as f, pytest.raises(OSError) as exc:
            os.pread(f.fileno(), 100, 2 * CHUNK)
        assert exc.value.errno == errno.EIO and fault.applied >= 1
        assert "chunk at byte" in m.log_text()
        fault.clear()
        with open(big, "rb") as f:
            assert os.pread(f.fileno(), 100, 2 * CHUNK) == BIG[2 * CHUNK:2 * CHUNK + 100]


def test_wrong_manifest_checksum_is_refused(registry, proxy, zimages, mnt, cache_dir):
    layer = zimages.wrong
    with Mount(f"{proxy.host}/zstdchunked/wrong:v1", mnt, cache_dir) as m:
        with pytest.raises(OSError) as exc:
            os.listdir(m.path("rootfs"))
        assert exc.value.errno == errno.EIO
        assert "refusing" in m.log_text() and "manifest-checksum" in m.log_text()
    assert not toc.toc_path(cache_dir, layer.digest).exists()
    assert proxy.bytes_sent(layer.digest) < layer.size / 50


def test_remount_lists_with_no_registry_request(registry, proxy, zimages, tmp_path, cache_dir):
    layer = zimages.base
    with Mount(f"{proxy.host}/zstdchunked/full:v1", tmp_path / "m1", cache_dir) as m:
        first = sorted(os.listdir(m.path("rootfs/etc")))
    proxy.reset()
    with Mount(f"{proxy.host}/zstdchunked/full:v1", tmp_path / "m2", cache_dir) as m:
        assert sorted(os.listdir(m.path("rootfs/etc"))) == first
        assert os.lstat(m.path("rootfs/opt/big")).st_size == len(BIG)
        assert proxy.matching(f"/blobs/{layer.digest}") == []


def test_unannotated_is_verified_whole_then_read_by_frames(registry, proxy, zimages, tmp_path, cache_dir):
    layer = zimages.bare
    with Mount(f"{proxy.host}/zstdchunked/bare:v1", tmp_path / "m1", cache_dir) as m:
        assert m.path("rootfs/etc/os-release").read_bytes() == b'NAME="estargz test"\n'
        assert proxy.bytes_sent(layer.digest) >= layer.size
        assert "from its zstd:chunked TOC" in m.log_text()
    (cache_dir / "blobs" / "sha256" / layer.digest.partition(":")[2]).unlink()
    proxy.reset()
    with Mount(f"{proxy.host}/zstdchunked/bare:v1", tmp_path / "m2", cache_dir) as m:
        with open(m.path("rootfs/opt/big"), "rb") as f:
            assert os.pread(f.fileno(), 100, 7 * CHUNK) == BIG[7 * CHUNK:7 * CHUNK + 100]
        row = chunk_row(layer, "./opt/big", 7 * CHUNK)
        assert proxy.bytes_sent(layer.digest) == row["endOffset"] - row["offset"]
