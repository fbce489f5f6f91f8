"""Layer indexes without FUSE: tar semantics, hostile members, whiteouts, persistence, gzip spans."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time

import pytest

from imagefs.descriptors import Descriptor
from imagefs.errors import DigestMismatch
from imagefs.layers import entries, service, tarindex, zran
from imagefs.layers.entries import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK
from imagefs.layers.merge import merge
from imagefs.layers.tarindex import normalise
from imagefs.testing import images as im
from tests.support.tars import M, dir_, layer


def build(tmp_path, blob: im.Blob):
    path = tmp_path / blob.digest.partition(":")[2]
    path.write_bytes(blob.data)
    return service.build(str(path), Descriptor(blob.media_type, blob.digest, blob.size))


def by_path(index) -> dict[str, entries.Entry]:
    return {e.path: e for e in index.entries}


def test_normalise():
    assert normalise("./etc/passwd") == "etc/passwd"
    assert normalise("etc//x/") == "etc/x"
    assert normalise("./") == ""
    assert normalise("/etc/passwd") is None
    assert normalise("a/../../x") is None
    assert normalise("..") is None


@pytest.mark.parametrize("compression", ["gzip", "none", "zstd"])
def test_members_metadata_and_offsets(tmp_path, compression):
    if compression == "zstd":
        pytest.importorskip("zstandard")
    long = "deep/" + "n" * 120 + "/file.txt"
    members = [
        dir_("./"), dir_("./etc"), M("./etc/passwd", b"root:x:0:0\n", uid=0),
        M("./usr/bin/su", b"su binary", mode=0o4755, uid=0, gid=0),
        dir_("tmp", 0o1777),
        M("dev/null", kind=tarfile.CHRTYPE, major=1, minor=3, mode=0o666),
        M("dev/sda", kind=tarfile.BLKTYPE, major=8, minor=0, mode=0o660, gid=6),
        M("run/fifo", kind=tarfile.FIFOTYPE),
        M("bin/sh", kind=tarfile.SYMTYPE, link="/bin/busybox", mode=0o777),
        M("bin/busybox", b"busybox" * 1000, mode=0o755, uid=1000, gid=1000),
        M("bin/ls", kind=tarfile.LNKTYPE, link="./bin/busybox"),
        M(long, b"long name"),
        M("cap", b"x", pax={"SCHILY.xattr.security.capability": "\x01\x02", "SCHILY.xattr.user.k": "v"}),
    ]
    blob = layer(members, compression)
    idx = build(tmp_path, blob)
    got = by_path(idx)
    tar = im.uncompressed(blob)
    assert got[""].kind == DIR
    assert got["etc/passwd"].kind == FILE and tar[got["etc/passwd"].offset:][:11] == b"root:x:0:0\n"
    assert got["usr/bin/su"].mode == 0o4755
    assert got["usr/bin/su"].st_mode & 0o4000
    assert got["tmp"].mode == 0o1777
    assert got["dev/null"].kind == CHAR and got["dev/null"].rdev == os.makedev(1, 3)
    assert got["dev/sda"].kind == BLOCK and got["dev/sda"].gid == 6
    assert got["run/fifo"].kind == FIFO
    assert got["bin/sh"].kind == SYMLINK and got["bin/sh"].target == "/bin/busybox"
    bb, ls = got["bin/busybox"], got["bin/ls"]
    assert ls.link == bb.link >= 0 and (ls.offset, ls.size, ls.uid) == (bb.offset, bb.size, 1000)
    assert tar[got[long].offset:][:9] == b"long name"
    assert got["cap"].xattrs == {"security.capability": b"\x01\x02", "user.k": b"v"}
    assert idx.compression == {"gzip": "gzip", "none": "tar", "zstd": "zstd"}[compression]


def test_gnu_long_names(tmp_path):
    long = "g/" + "x" * 150
    blob = layer([M(long, b"gnu"), M("g/l", kind=tarfile.SYMTYPE, link="y" * 150)], "none", fmt=tarfile.GNU_FORMAT)
    got = by_path(build(tmp_path, blob))
    assert got[long].size == 3 and got["g/l"].target == "y" * 150


def test_hostile_members_are_skipped_and_the_rest_works(tmp_path, caplog):
    members = [
        M("../escape", b"no"), M("/etc/abs", b"no"), M("a/../../b", b"no"),
        M("ok/one", b"first"), M("ok/one", b"second"),  # duplicate: the last wins
        M("hl", kind=tarfile.LNKTYPE, link="../../etc/shadow"),
        M("hl2", kind=tarfile.LNKTYPE, link="not/here"),
        M("hl3", kind=tarfile.LNKTYPE, link="ok"),  # a directory: refused
        M("file", b"f"), M("file/under", b"u"),  # a member below a file makes it a directory
        dir_("d"), M("d/x", b"x"), M("d", b"now a file"),  # a file replacing a directory drops its contents
        M("ok/two", b"2"),
    ]
    got = by_path(build(tmp_path, layer(members)))
    # "ok" is implied, not a member; links to paths not in the layer wait for rootfs/ to resolve them.
    assert set(got) == {"ok/one", "ok/two", "file", "file/under", "d", "hl2", "hl3"}
    assert got["hl2"].kind == got["hl3"].kind == HARDLINK and got["hl2"].target == "not/here"
    assert set(merge([[e("not", DIR), e("not/here"), e("ok", DIR)], list(got.values())]).items) == {
        "not", "not/here", "hl2", "ok", "ok/one", "ok/two", "file", "file/under", "d"}
    assert got["ok/one"].size == len("second")
    assert got["file"].kind == DIR and got["d"].kind == FILE
    assert "escapes the layer" in caplog.text and "hard link" in caplog.text


def test_large_layer_index_is_small_and_loads_fast(tmp_path):
    members = [dir_(f"d{i}") for i in range(100)] + [M(f"d{i % 100}/file-{i}", b"%d" % i) for i in range(20_000)]
    blob = layer(members)
    # CPU seconds of this process, not wall-clock ones: other processes on a loaded machine
    # stretch the latter (a 1 s build took 12 s beside a few busy loops on two cores)
    t = time.process_time()
    idx = build(tmp_path, blob)
    built = time.process_time() - t
    assert len(idx.entries) == 20_100
    path = entries.save(tmp_path / "cache", idx)
    assert path.name.endswith(".v3") and path.stat().st_size < 400_000
    t = time.process_time()
    again = entries.load(tmp_path / "cache", blob.digest)
    loaded = time.process_time() - t
    assert again.entries == idx.entries
    assert built < 10 and loaded < 2, (built, loaded)


def test_a_damaged_index_is_rebuilt_not_fatal(tmp_path):
    idx = build(tmp_path, layer([M("a", b"a")]))
    path = entries.save(tmp_path, idx)
    path.write_bytes(b"garbage")
    assert entries.load(tmp_path, idx.digest) is None


def e(path, kind=FILE, **kw):
    return entries.Entry(path, kind, 0o755 if kind == DIR else 0o644, **kw)


def test_whiteouts():
    lower = [e("a", DIR), e("a/x"), e("a/y"), e("b", DIR), e("b/deep", DIR), e("b/deep/f"), e("c"), e("o", DIR), e("o/old"),
             e("keep")]
    upper = [e("a/.wh.x"), e(".wh.b"), e("o/new"), e("o/.wh..wh..opq"), e(".wh..wh.plnk"), e("c", DIR), e("c/now")]
    m = merge([lower, upper])
    assert set(m.items) == {"a", "a/y", "c", "c/now", "o", "o/new", "keep"}
    assert list(m.children["o"]) == ["o/new"]
    raw = merge([upper], whiteouts=False)
    assert "a/.wh.x" in raw.items and "o/.wh..wh..opq" in raw.items


def test_hard_link_counts_follow_whiteouts():
    lower = [e("f", link=0), e("g", link=0), e("h", link=0)]
    m = merge([lower, [e(".wh.g")]])
    assert m.nlink[(0, 0)] == 2


def test_gzip_spans_are_verified(tmp_path):
    data = im.random_bytes(10 << 20, 1)
    blob = im.tar_layer({"big": data, "small": b"hello"})
    idx = build(tmp_path, blob)
    assert len(idx.spans) >= 3
    got = by_path(idx)
    fetched = []

    def fetch(start, end):
        fetched.append((start, end))
        return blob.data[start:end], False  # unchecked: SpanFile checks each span

    ra = zran.RandomAccess(zran.SpanFile(blob.size, idx.spans, fetch, "t"), idx.zran)
    off = got["big"].offset + (6 << 20)
    assert ra.pread(off, 4096) == data[6 << 20 : (6 << 20) + 4096]
    assert sum(e - s for s, e in fetched) <= max(e - s for s, _, e in idx.spans) < blob.size  # one span: never the blob
    bad = bytearray(blob.data)
    bad[fetched[0][0] + 10] ^= 0xFF
    ra = zran.RandomAccess(zran.SpanFile(blob.size, idx.spans, lambda s, e: (bytes(bad[s:e]), False), "t"), idx.zran)
    with pytest.raises(DigestMismatch):
        ra.pread(off, 4096)


def test_pax_mtimes_are_integer_ns_and_an_older_index_version_is_replaced(tmp_path):
    members = [M("f", b"f", pax={"mtime": "1700000000.17235313"}), M("w", b"w"), M("n", b"n", pax={"mtime": "-1.5"})]
    blob = layer(members)
    hex_ = blob.digest.partition(":")[2]
    old = tmp_path / "cache" / "indexes" / "sha256" / f"{hex_}.v2"  # float seconds: never to be read
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an index of an older imagefs")
    idx = build(tmp_path, blob)
    assert {e.path: e.mtime for e in idx.entries} == {"f": 1700000000_172353130, "w": im.EPOCH * 10**9, "n": -1_500000000}
    assert idx.uncompressed == im.diff_id(blob)
    entries.save(tmp_path / "cache", idx)
    assert not old.exists()
    again = entries.load(tmp_path / "cache", blob.digest)
    assert again == idx and all(type(e.mtime) is int for e in again.entries)


def _tars(tmp_path) -> dict[str, bytes]:
    """Tars whose headers take every branch of QuickTarInfo: each format, long names and links, a
    ustar prefix, devices, numbers tarfile writes in base 256, a sparse file by GNU tar, a V7 dir,
    a header whose checksum only the signed sum matches, and a stream cut inside a member."""
    long = "p/" + "n" * 120 + "/" + "f" * 90  # a ustar prefix where ustar can, a long name elsewhere
    members = [dir_("./d/"), M("./d/f", b"x" * 700, uid=1000, gid=1000, pax={"SCHILY.xattr.user.a": "1"}),
               M(long, b"long"), M("d/h", kind=tarfile.LNKTYPE, link="d/f"), M("d/l", kind=tarfile.SYMTYPE, link="z" * 150),
               M("dev/c", kind=tarfile.CHRTYPE, major=4, minor=64), M("dev/b", kind=tarfile.BLKTYPE, major=8, minor=1),
               M("dev/p", kind=tarfile.FIFOTYPE), M("u/big", b"b", uid=0o7777777 + 1, gid=2**21 + 5), M("é/ü", b"utf-8")]
    out = {}
    for name, fmt in (("pax", tarfile.PAX_FORMAT), ("gnu", tarfile.GNU_FORMAT)):
        out[name] = im.uncompressed(layer(members, "none", fmt=fmt))
    out["ustar"] = im.uncompressed(layer([m for m in members if m.uid < 0o7777777 and len(m.link) < 100], "none",
                                         fmt=tarfile.USTAR_FORMAT))
    v7 = bytearray(tarfile.TarInfo("v7dir/").tobuf(tarfile.USTAR_FORMAT))
    v7[156:157] = tarfile.AREGTYPE
    signed = bytearray(tarfile.TarInfo("s\xe9gned").tobuf(tarfile.USTAR_FORMAT, "latin-1"))
    for buf, chksum in ((v7, None), (signed, 256 + sum(tarfile.struct.unpack_from("148b8x356b", signed)))):
        buf[148:156] = b" " * 8
        buf[148:156] = b"%06o\0 " % (chksum or 256 + sum(buf[:148]) + sum(buf[156:]))
    out["odd"] = bytes(v7 + signed) + bytes(1024)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    os.utime(src / "sparse", (1e9, 1e9))
    for fmt in ("gnu", "posix"):
        done = subprocess.run(["tar", "-C", str(src), f"--format={fmt}", "--sparse", "-cf", "-", "sparse"],
                              capture_output=True, check=True)
        out[f"sparse-{fmt}"] = done.stdout
    out["cut"] = out["pax"][:len(out["pax"]) // 2 + 100]
    return out


def test_quick_headers_are_tarfiles_own(tmp_path):
    # the quick header parse (tarindex.QuickTarInfo) and the Forward reader must give exactly what
    # tarfile's own stream mode gives: the same TarInfo fields, members and errors, on every shape
    def members(data: bytes, quick: bool) -> list:
        if quick:
            at = iter(data[i:i + 1000] for i in range(0, len(data), 1000))
            fileobj, mode = tarindex.Forward(lambda: next(at, b"")), "r:"
        else:
            fileobj, mode = io.BytesIO(data), "r|"
        rows = []
        try:
            with tarfile.open(fileobj=fileobj, mode=mode, tarinfo=tarindex.QuickTarInfo if quick else tarfile.TarInfo) as t:
                for info in t:
                    rows.append((info.get_info(), info.offset, info.offset_data, info.pax_headers, info.sparse,
                                 info.chksum))
        except tarfile.TarError as exc:
            rows.append(type(exc).__name__)
        return rows

    for name, data in _tars(tmp_path).items():
        want = members(data, False)
        assert want and not isinstance(want[0], str), name
        assert members(data, True) == want, name
        whole = iter([data])
        found, size, skipped = tarindex.scan(tarindex.Forward(lambda: next(whole, b"")), name)
        assert (found, size, skipped) == tarindex.scan(io.BytesIO(data), name), name
