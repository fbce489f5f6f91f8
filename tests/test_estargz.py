"""eStargz layers through real mounts: listed from footer + TOC, read chunk by chunk, all verified.

The layers are written by :mod:`imagefs.testing.estargz` to the published format; what a mount
shows is compared entry by entry with ``umoci unpack`` of the same image (an eStargz blob is a
plain tar+gzip to umoci), and what it costs is counted at the proxy in front of the registry.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import tarfile
import time

import pytest

from imagefs.errors import InvalidLayer
from imagefs.layers import estargz as ereader
from imagefs.layers import toc
from imagefs.testing import estargz
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support.mounting import Mount
from tests.support.tars import M, dir_, raw_tar
from tests.test_rootfs import snapshot, unpack

BIG = im.random_bytes(12 << 20, 21)
LONG = "usr/share/" + "a-rather-long-directory-name-" * 5 + "/file.txt"
CHUNK = 1 << 20


def base_tar() -> bytes:
    return raw_tar([
        dir_("./"), dir_("./etc"), M("./etc/os-release", b'NAME="estargz test"\n'),
        M("./etc/issue", kind=tarfile.SYMTYPE, link="os-release", mode=0o777),
        dir_("./bin"), M("./bin/busybox", b"#!busybox\n" * 30_000, mode=0o755),  # 300 KB: one chunk
        M("./bin/ls", kind=tarfile.LNKTYPE, link="./bin/busybox"),
        M("./bin/sh", kind=tarfile.SYMTYPE, link="/bin/busybox", mode=0o777),
        dir_("./usr"), dir_("./usr/bin"), M("./usr/bin/su", b"su", mode=0o4755),
        M("./usr/bin/wall", b"wall", mode=0o2755, gid=5), dir_("./tmp", 0o1777),
        dir_("./home"), dir_("./home/u", 0o700), M("./home/u/.profile", b"PS1=$\n", uid=1000, gid=1000),
        dir_("./dev"), M("./dev/null", kind=tarfile.CHRTYPE, major=1, minor=3, mode=0o666),
        M("./dev/loop0", kind=tarfile.BLKTYPE, major=7, minor=0, mode=0o660, gid=6),
        M("./dev/initctl", kind=tarfile.FIFOTYPE, mode=0o600),
        dir_("./a"), M("./a/x", b"x"), M("./a/y", b"y"), M("./a/empty", b""), dir_("./o"), M("./o/old", b"old"),
        M("./keep", b"v1"), dir_("./usr/share"), dir_("./usr/share/" + "a-rather-long-directory-name-" * 5),
        M("./" + LONG, b"long\n"), M("./caps", b"caps", pax={"SCHILY.xattr.user.imagefs.test": "hello"}),
        dir_("./opt"), M("./opt/big", BIG),
    ])


def upper_tar() -> bytes:
    return raw_tar([
        M("a/.wh.x"), M(".wh.keep"), dir_("o"), M("o/new", b"new"), M("o/.wh..wh..opq"),
        M("bin/ls2", kind=tarfile.LNKTYPE, link="bin/busybox"), M("etc/motd", b"hello from the top\n"),
    ])


def toc_of(blob: im.Blob) -> tuple[int, dict]:
    """The TOC offset and JSON of a blob we built, read back by hand (for expected costs)."""
    start = ereader.toc_offset(blob.data[-51:], blob.size)
    raw, _ = ereader.read_toc(blob.data[start:-51], "test")
    return start, json.loads(raw)


def chunk_extent(blob: im.Blob, name: str, pos: int) -> int:
    """Compressed bytes of the chunk of ``name`` holding byte ``pos``: what reading it must cost."""
    start, doc = toc_of(blob)
    offsets = sorted({r["offset"] for r in doc["entries"] if r.get("offset")} | {start})
    rows = [r for r in doc["entries"] if r["name"] == name and r.get("offset")]
    row = max((r for r in rows if r.get("chunkOffset", 0) <= pos), key=lambda r: r.get("chunkOffset", 0))
    return offsets[offsets.index(row["offset"]) + 1] - row["offset"]


class EstargzImages:
    def __init__(self, registry) -> None:
        host = registry.host
        self.base = estargz.layer(base_tar(), chunk_size=CHUNK)
        self.upper = estargz.layer(upper_tar(), min_chunk_size=4096, landmark=estargz.PREFETCH_LANDMARK)  # innerOffset
        plain = im.tar_layer({"etc/plain.txt": b"a plain gzip layer on top\n"})
        self.full = im.image([self.base, self.upper, plain])
        push(host, "estargz/full", self.full, "v1")

        self.wrong = estargz.layer(base_tar(), chunk_size=CHUNK, toc_digest="sha256:" + "0" * 64)
        push(host, "estargz/wrong", im.image([self.wrong]), "v1")

        self.bare = estargz.layer(base_tar(), chunk_size=CHUNK, annotate=False)
        push(host, "estargz/bare", im.image([self.bare]), "v1")

        self.hostile = estargz.layer(raw_tar([
            M("../escape", b"no"), M("/abs", b"no"), M("x", b"1"), M("x", b"2"),
            M("hl", kind=tarfile.LNKTYPE, link="../../etc/shadow"), M("ok", b"fine\n"),
        ]))
        push(host, "estargz/hostile", im.image([self.hostile]), "v1")

        def outside(rows: list[dict]) -> None:  # a chunk pointing past the layer's data
            next(r for r in rows if r["name"] == "./opt/big")["offset"] = 1 << 40
        self.lying_toc = estargz.layer(base_tar(), chunk_size=CHUNK, edit=outside)
        push(host, "estargz/lying-toc", im.image([self.lying_toc]), "v1")

        def misdigest(rows: list[dict]) -> None:  # gzip's CRC would catch a flipped byte first: lie instead
            next(r for r in rows if r["name"] == "./etc/os-release")["chunkDigest"] = im.digest_of(b"other")
        self.misdigested = estargz.layer(base_tar(), chunk_size=CHUNK, edit=misdigest)
        push(host, "estargz/misdigested", im.image([self.misdigested]), "v1")

        # annotated as eStargz, but an ordinary tar+gzip: indexed the ordinary way
        self.liar = im.Blob(im.OCI_LAYER_GZIP, im.compress(raw_tar([M("etc/x", b"plain\n")]), "gzip"),
                            annotations=((estargz.TOC_ANNOTATION, im.digest_of(b"{}")),))
        push(host, "estargz/liar", im.image([self.liar]), "v1")


@pytest.fixture(scope="session")
def eimages(registry) -> EstargzImages:
    return EstargzImages(registry)


def test_rootfs_equals_umoci_unpack(registry, eimages, tmp_path, mnt, cache_dir):
    want = snapshot(unpack(registry, "estargz/full", tmp_path))
    with Mount(f"{registry.host}/estargz/full:v1", mnt, cache_dir) as m:
        got = snapshot(m.path("rootfs"))
        log = m.log_text()
    assert "Traceback" not in log, log
    assert log.count("from its estargz TOC") == 2  # both eStargz layers lazily, the gzip one not
    differ = sorted((k, got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    assert differ == []
    assert {"stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark", "opt", "etc"} <= set(got)
    assert "keep" not in got and "a/x" not in got and got["o/new"] and "o/old" not in got
    assert got["bin/busybox"][-1] == 3  # busybox, ls, and ls2 from the upper layer: one inode


def test_xattrs_links_and_fs_view(registry, eimages, mnt, cache_dir):
    with Mount(f"{registry.host}/estargz/full:v1", mnt, cache_dir) as m:
        root = m.path("rootfs")
        assert os.getxattr(root / "caps", "user.imagefs.test") == b"hello"
        assert len({os.lstat(root / "bin" / n).st_ino for n in ("busybox", "ls", "ls2")}) == 1
        assert os.readlink(root / "bin/sh") == "/bin/busybox"
        assert (root / "etc/motd").read_bytes() == b"hello from the top\n"  # a file sharing its gzip member
        upper = m.path(f"layer-{eimages.upper.digest}", "fs")
        assert {".wh.keep", "o", "a", "stargz.index.json", ".prefetch.landmark"} <= set(os.listdir(upper))
        assert json.loads((upper / "stargz.index.json").read_bytes())["version"] == 1


def test_listing_costs_two_small_ranges_and_a_read_only_its_chunk(registry, proxy, eimages, mnt, cache_dir):
    layer = eimages.base
    toc_start, _ = toc_of(layer)
    with Mount(f"{proxy.host}/estargz/full:v1", mnt, cache_dir) as m:
        root = m.path("rootfs")
        assert {"opt", "etc", "bin", "usr"} <= set(os.listdir(root))
        assert os.lstat(root / "opt/big").st_size == len(BIG)
        gets = proxy.gets(f"/blobs/{layer.digest}")
        assert len(gets) == 2 and all("range" in h.request_headers for h in gets)
        assert proxy.bytes_sent(layer.digest) == 51 + (layer.size - 51 - toc_start)
        listed = proxy.bytes_sent(layer.digest)
        assert listed < layer.size / 50

        with open(root / "opt/big", "rb") as f:
            assert os.pread(f.fileno(), 4096, (6 << 20) + 100) == BIG[(6 << 20) + 100:(6 << 20) + 4196]
        one = chunk_extent(layer, "./opt/big", 6 << 20)
        assert proxy.bytes_sent(layer.digest) - listed == one  # exactly that chunk's compressed bytes
        assert len(proxy.gets(f"/blobs/{layer.digest}")) == 3
        assert (root / "etc/os-release").read_bytes() == b'NAME="estargz test"\n'
        assert proxy.bytes_sent(layer.digest) - listed - one < 64 << 10
        assert not (cache_dir / "blobs" / "sha256" / layer.digest.partition(":")[2]).exists()  # never fetched whole


def test_corrupted_chunk_is_eio_and_mount_lives(registry, proxy, eimages, mnt, cache_dir):
    layer = eimages.base
    _, doc = toc_of(layer)
    row = next(r for r in doc["entries"] if r["name"] == "./opt/big" and r.get("chunkOffset") == 9 * CHUNK)
    with Mount(f"{proxy.host}/estargz/full:v1", mnt, cache_dir) as m:
        big = m.path("rootfs/opt/big")
        fault = proxy.corrupt(layer.digest, offset=row["offset"] + 300)
        with open(big, "rb") as f, pytest.raises(OSError) as exc:
            os.pread(f.fileno(), 4096, 9 * CHUNK + 10)
        assert exc.value.errno == errno.EIO
        assert fault.applied >= 1  # the kernel may ask twice: each answer was checked, and refused
        assert "chunk at byte" in m.log_text()
        fault.clear()
        with open(big, "rb") as f:  # nothing bad was kept: the next read fetches again and is right
            assert os.pread(f.fileno(), 4096, 9 * CHUNK + 10) == BIG[9 * CHUNK + 10:9 * CHUNK + 4106]


def test_wrong_toc_digest_is_refused(registry, proxy, eimages, mnt, cache_dir):
    layer = eimages.wrong
    with Mount(f"{proxy.host}/estargz/wrong:v1", mnt, cache_dir) as m:
        with pytest.raises(OSError) as exc:
            os.listdir(m.path("rootfs"))
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.listdir(m.path(f"layer-{layer.digest}", "fs"))
        assert exc.value.errno == errno.EIO
        assert "refusing" in m.log_text() and "toc.digest annotation" in m.log_text()
        assert os.listdir(m.path()) != []  # the mount lives
    assert not toc.toc_path(cache_dir, layer.digest).exists()
    assert all("range" in h.request_headers for h in proxy.gets(f"/blobs/{layer.digest}"))


def test_remount_lists_with_no_registry_request(registry, proxy, eimages, tmp_path, cache_dir):
    layer = eimages.base
    with Mount(f"{proxy.host}/estargz/full:v1", tmp_path / "m1", cache_dir) as m:
        first = sorted(os.listdir(m.path("rootfs/bin")))
    assert toc.toc_path(cache_dir, layer.digest).exists()
    proxy.reset()
    with Mount(f"{proxy.host}/estargz/full:v1", tmp_path / "m2", cache_dir) as m:
        root = m.path("rootfs")
        assert sorted(os.listdir(root / "bin")) == first
        assert os.lstat(root / "opt/big").st_size == len(BIG)
        assert proxy.matching(f"/blobs/{layer.digest}") == []
        assert (root / "a/y").read_bytes() == b"y"  # and a read costs its chunk only
        assert 0 < proxy.bytes_sent(layer.digest) < 64 << 10


def test_unannotated_estargz_is_verified_whole_then_read_by_chunks(registry, proxy, eimages, tmp_path, cache_dir):
    layer = eimages.bare
    with Mount(f"{proxy.host}/estargz/bare:v1", tmp_path / "m1", cache_dir) as m:
        assert (m.path("rootfs/opt/big").read_bytes()) == BIG
        assert proxy.bytes_sent(layer.digest) >= layer.size  # no annotation: the TOC is trusted only with the blob
        assert "from its estargz TOC" in m.log_text()
    assert toc.toc_path(cache_dir, layer.digest).exists()
    (cache_dir / "blobs" / "sha256" / layer.digest.partition(":")[2]).unlink()
    proxy.reset()
    with Mount(f"{proxy.host}/estargz/bare:v1", tmp_path / "m2", cache_dir) as m:
        with open(m.path("rootfs/opt/big"), "rb") as f:
            assert os.pread(f.fileno(), 100, 3 * CHUNK) == BIG[3 * CHUNK:3 * CHUNK + 100]
        assert proxy.bytes_sent(layer.digest) == chunk_extent(layer, "./opt/big", 3 * CHUNK)


def test_annotated_plain_gzip_falls_back(registry, eimages, mnt, cache_dir):
    with Mount(f"{registry.host}/estargz/liar:v1", mnt, cache_dir) as m:
        t = time.monotonic()
        assert m.path("rootfs/etc/x").read_bytes() == b"plain\n"
        assert time.monotonic() - t < 30
        assert "indexing it as a plain layer" in m.log_text()
    assert not toc.toc_path(cache_dir, eimages.liar.digest).exists()


def test_hostile_names_never_escape(registry, eimages, mnt, cache_dir):
    with Mount(f"{registry.host}/estargz/hostile:v1", mnt, cache_dir) as m:
        root = m.path("rootfs")
        assert set(os.listdir(root)) == {"x", "ok", "stargz.index.json", ".no.prefetch.landmark"}
        assert (root / "x").read_bytes() == b"2" and (root / "ok").read_bytes() == b"fine\n"
        assert "escapes the layer" in m.log_text()


def test_verified_but_impossible_toc_is_eio(registry, eimages, mnt, cache_dir):
    with Mount(f"{registry.host}/estargz/lying-toc:v1", mnt, cache_dir) as m:
        with pytest.raises(OSError) as exc:
            os.listdir(m.path("rootfs"))
        assert exc.value.errno == errno.EIO
        assert "points outside the layer's data" in m.log_text()
        assert os.path.ismount(m.path())
    assert not toc.toc_path(cache_dir, eimages.lying_toc.digest).exists()


def _toc(*rows: dict) -> bytes:
    return json.dumps({"version": 1, "entries": list(rows)}).encode()


@pytest.mark.parametrize("row, why", [
    ({"name": "f", "type": "reg", "size": 10, "offset": 2000, "chunkDigest": "sha256:" + "0" * 64}, "points outside"),
    ({"name": "f", "type": "reg", "size": 10, "offset": 10, "chunkSize": 4, "chunkDigest": "sha256:" + "0" * 64}, "cover 4 of"),
    ({"name": "f", "type": "reg", "size": 10, "offset": 10}, "no usable sha256"),
    ({"name": "f", "type": "reg", "size": 1 << 40, "offset": 10, "chunkDigest": "sha256:" + "0" * 64}, "impossible size"),
    ({"name": "f", "type": "chunk", "offset": 10}, "follows no such file"),
    ({"name": "f", "type": "reg", "size": "ten"}, "malformed TOC entry"),
])
def test_unusable_toc_rows_refuse_the_layer(row, why):
    with pytest.raises(InvalidLayer, match=why):
        toc.parse(_toc(row), toc.ESTARGZ, "sha256:" + "0" * 64, "test", 1000, checksum="")


def test_toc_names_follow_the_tar_rules():
    found = toc.parse(_toc({"name": "../x", "type": "reg"}, {"name": "/abs", "type": "dir"}, {"name": "./d/", "type": "dir"},
                           {"name": "d/f", "type": "reg"}, {"name": "hl", "type": "hardlink", "linkName": "../../etc/shadow"},
                           {"name": "d/l", "type": "hardlink", "linkName": "d/f"}, {"name": "odd", "type": "socket"}),
                      toc.ESTARGZ, "sha256:" + "0" * 64, "test", 1000, checksum="")
    paths = {e.path: e for e in found.index.entries}
    assert set(paths) == {"d", "d/f", "d/l"} and found.index.skipped == 4
    assert paths["d/l"].link == paths["d/f"].link >= 0 and paths["d/l"].offset == paths["d/f"].offset


@pytest.mark.parametrize("doc, want", [
    (b'{"other": {"entries": [{"name": "no"}]}, "entries": [{"name": "a"}, {"name": "b"}], "version": 1}', ["a", "b"]),
    (b' { "entries" : [ ] } ', []),
    (b'{"version": 1}', "has no entries"),
    (b'[{"name": "a"}]', "not a JSON table of contents"),
    (b'{"entries": [{"name": "a"} {"name": "b"}]}', "not a JSON table of contents"),
    (b'{"entries": [1]}', "not a JSON object"),
    (b'{"entries": [{"name": "a"', "not valid JSON"),
    (b'\xff', "not UTF-8"),
])
def test_toc_rows_are_read_one_at_a_time(doc, want):
    if isinstance(want, list):
        assert [r["name"] for r in toc.rows(doc, "test")] == want
    else:
        with pytest.raises(InvalidLayer, match=want):
            list(toc.rows(doc, "test"))


def test_a_tampered_cached_toc_is_not_used(tmp_path):
    raw = _toc({"name": "f", "type": "reg"})
    toc.save(tmp_path, "sha256:" + "ab" * 32, toc.Saved(toc.ESTARGZ, raw, "sha256:x", 10))
    assert toc.load(tmp_path, "sha256:" + "ab" * 32).raw == raw
    path = toc.toc_path(tmp_path, "sha256:" + "ab" * 32)
    head, _, body = gzip.decompress(path.read_bytes()).partition(b"\n")
    path.write_bytes(gzip.compress(head + b"\n" + body.replace(b'"f"', b'"g"')))
    assert toc.load(tmp_path, "sha256:" + "ab" * 32) is None


def test_reading_through_a_file_reads_ahead_one_chunk(registry, proxy, eimages, mnt, cache_dir):
    layer = eimages.base
    with Mount(f"{proxy.host}/estargz/full:v1", mnt, cache_dir) as m:
        with open(m.path("rootfs/opt/big"), "rb") as f:
            os.pread(f.fileno(), 4096, 2 * CHUNK + 100)  # first half of a chunk: that chunk alone
            one = proxy.bytes_sent(layer.digest)
            os.pread(f.fileno(), 4096, 2 * CHUNK + CHUNK // 2 + 100)  # second half: the next one starts
            deadline = time.monotonic() + 10
            while proxy.bytes_sent(layer.digest) == one and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proxy.bytes_sent(layer.digest) - one == chunk_extent(layer, "./opt/big", 3 * CHUNK)
            n = len(proxy.gets(f"/blobs/{layer.digest}"))
            assert os.pread(f.fileno(), 4096, 3 * CHUNK) == BIG[3 * CHUNK:3 * CHUNK + 4096]
            assert len(proxy.gets(f"/blobs/{layer.digest}")) == n  # already here


def test_chunk_not_matching_its_digest_is_eio(registry, eimages, mnt, cache_dir):
    with Mount(f"{registry.host}/estargz/misdigested:v1", mnt, cache_dir) as m:
        with pytest.raises(OSError) as exc:
            m.path("rootfs/etc/os-release").read_bytes()
        assert exc.value.errno == errno.EIO
        assert "does not match its chunkDigest" in m.log_text()
        assert m.path("rootfs/a/y").read_bytes() == b"y"  # the rest of the layer reads
