"""SOCI zTOCs (imagefs/layers/ztoc.py, zinfo.py) checked against real tools, no mocks.

The layers are built with tarfile + gzip; ``flatc`` (Debian's flatbuffers-compiler) reads the
zTOCs through our own copy of the schema (tests/support/ztoc.fbs) and writes zTOCs we read; the
checkpoints are proved twice: by indexed_gzip (the read path, through GZIDX) and by plain zlib
with the stream re-aligned by hand (Python's zlib has no inflatePrime).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagefs.errors import InvalidZtoc
from imagefs.layers import gzindex, zinfo, zran, ztoc
from imagefs.layers.entries import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK

SCHEMA = Path(__file__).parent / "support" / "ztoc.fbs"
SPAN = 64 << 10  # small: many checkpoints in a few MiB
FLATC = shutil.which("flatc")


def flatc() -> str:
    """flatc, the independent decoder these tests check zTOCs with: mount.sh installs it, and a
    machine without it fails here rather than skipping the check."""
    assert FLATC is not None, "flatc is not installed (Debian: flatbuffers-compiler; ./mount.sh installs it)"
    return FLATC
TYPES = {tarfile.REGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
         tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def layer_tar(big: bool = True) -> bytes:
    rnd = random.Random(7)
    out = io.BytesIO()
    words = [bytes(rnd.choice(b"abcdefghij") for _ in range(rnd.randint(2, 9))) for _ in range(800)]
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add(name, kind=tarfile.REGTYPE, data=b"", **kw):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime, info.mode = kind, len(data), 1_700_000_000, kw.pop("mode", 0o644)
            for k, v in kw.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(data) if data else None)

        add("./", tarfile.DIRTYPE, mode=0o755)
        add("./etc/", tarfile.DIRTYPE, mode=0o755)
        add("./etc/hello", data=b"hello\n", uid=1000, gid=100, uname="u", gname="g")
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        add("usr/bin/su", data=b"#!/bin/sh\n", mode=0o4755)
        add("usr/bin/wall", data=b"#!/bin/sh\n", mode=0o2755, gid=5)
        if big:
            add("usr/big.bin", data=rnd.randbytes(3 << 20))
            add("usr/text.txt", data=b" ".join(rnd.choice(words) for _ in range(400_000)))
        add("usr/xattr", data=b"x", pax_headers={"SCHILY.xattr.user.comment": "hi", "SCHILY.xattr.trusted.x": "y"})
        add("usr/nsec", data=b"n", pax_headers={"mtime": "1700000000.123456789"})
        add("etc/link", tarfile.SYMTYPE, linkname="hello", mode=0o777)
        add("etc/hard", tarfile.LNKTYPE, linkname="./etc/hello")
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660)
        add("run/fifo", tarfile.FIFOTYPE, mode=0o600)
        add("../escape", data=b"bad")
        add("./x/./y", data=b"first")
        add("x/y", data=b"second wins")
        if big:
            add("usr/tail.txt", data=b" ".join(rnd.choice(words) for _ in range(100_000)))
    return out.getvalue()


@pytest.fixture(scope="module")
def layer(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ztoc")
    tar = layer_tar()
    blob = gzip.compress(tar, compresslevel=6, mtime=0)
    path = tmp / "layer.tar.gz"
    path.write_bytes(blob)
    z = ztoc.decode(ztoc.encode(gzindex.build_ztoc(str(path), SPAN, "test", sparse=SPAN, budget=None)), "test")
    data = ztoc.encode(z)
    (tmp / "layer.ztoc").write_bytes(data)
    return {"tmp": tmp, "tar": tar, "blob": blob, "path": path, "z": z, "data": data}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> bytes:
    """A zTOC of a layer of a few members and two spans: quick to fuzz."""
    path = tmp_path_factory.mktemp("small") / "small.tar.gz"
    rnd = random.Random(3)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(4):
            data = rnd.randbytes(40 << 10)
            info = tarfile.TarInfo(f"d/f{i}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(out.getvalue(), mtime=0))
    return ztoc.encode(gzindex.build_ztoc(str(path), 64 << 10, "small", sparse=64 << 10, budget=None))


def flatc_json(tmp: Path, data: bytes, name: str = "z") -> dict:
    binary = tmp / f"{name}.ztoc"
    binary.write_bytes(data)
    subprocess.run([flatc(), "--json", "--strict-json", "--raw-binary", "-o", str(tmp), str(SCHEMA), "--", str(binary)],
                   check=True, capture_output=True, timeout=60)
    return json.loads((tmp / f"{name}.json").read_text())


def flatc_binary(tmp: Path, doc: dict, name: str) -> bytes:
    src = tmp / f"{name}.json"
    src.write_text(json.dumps(doc))
    out = tmp / f"{name}-bin"
    subprocess.run([flatc(), "-b", "-o", str(out), str(SCHEMA), str(src)], check=True, capture_output=True, timeout=60)
    return (out / f"{name}.bin").read_bytes()


def realigned_inflate(blob: bytes, c: zinfo.Checkpoint, n: int) -> bytes:
    """``n`` bytes inflated from checkpoint ``c`` with nothing but zlib: the stream shifted so it
    starts at the checkpoint's bit, then raw-inflated with the window as dictionary."""
    start = c.compressed - (1 if c.bits else 0)
    raw = blob[start:start + n + (1 << 20)]
    if c.bits:
        raw = (int.from_bytes(raw, "little") >> (8 - c.bits)).to_bytes(len(raw), "little")
    return zlib.decompressobj(-15, zdict=c.window).decompress(raw, n)


# -- the format ------------------------------------------------------------------------------------


def test_the_layer_has_many_checkpoints_some_inside_a_byte(layer):
    z = layer["z"]
    assert len(z.checkpoints) > 20 and any(c.bits for c in z.checkpoints)
    first = z.checkpoints[0]
    assert (first.compressed, first.uncompressed, first.bits) == (zran.header_length(layer["blob"]), 0, 0), \
        "checkpoint 0 sits just past the gzip header, as soci's zinfo v2 stores it"
    gaps = [b.compressed - a.compressed for a, b in zip(z.checkpoints, z.checkpoints[1:])]
    assert SPAN / 4 < max(gaps) < 1.1 * SPAN, "each span ends at the last block boundary within the span size"
    assert z.compressed_size == len(layer["blob"]) and z.uncompressed_size == len(layer["tar"])
    assert z.version == "0.9"


def test_flatc_reads_it_and_agrees_with_tarfile(layer):
    doc = flatc_json(layer["tmp"], layer["data"], "agree")
    rows = doc["toc"]["metadata"]
    t = tarfile.open(fileobj=io.BytesIO(layer["tar"]))
    members = t.getmembers()
    assert len(rows) == len(members)
    for row, m in zip(rows, members, strict=True):
        assert row["name"] == m.name
        assert row["type"] == TYPES[m.type], m.name
        assert row.get("uncompressed_offset", 0) == m.offset_data, m.name
        assert row.get("uncompressed_size", 0) == m.size, m.name
        assert row.get("mode", 0) == m.mode, m.name
        assert (row.get("uid", 0), row.get("gid", 0)) == (m.uid, m.gid), m.name
        assert row.get("linkname", "") == m.linkname, m.name
        assert (row.get("devmajor", 0), row.get("devminor", 0)) == (m.devmajor, m.devminor), m.name
        assert {x["key"]: x["value"] for x in row.get("xattrs", [])} == m.pax_headers, m.name
        if m.isreg() and m.size:
            assert layer["tar"][m.offset_data:m.offset_data + m.size] == t.extractfile(m).read()
    nsec = next(r for r in rows if r["name"] == "usr/nsec")
    assert nsec["mod_time"] == "2023-11-14T22:13:20.123456789Z"
    info = doc["compression_info"]
    assert len(info["span_digests"]) == info["max_span_id"] + 1 == len(layer["z"].checkpoints)
    assert "compression_algorithm" not in info, "gzip is the default: not written, as soci does not"
    assert doc["compressed_archive_size"] == len(layer["blob"])


def test_every_span_digest_is_its_bytes_of_the_blob(layer):
    z, blob = layer["z"], layer["blob"]
    ends = []
    for i, digest in enumerate(z.span_digests):
        start, end = ztoc.span_range(z, i)
        c = z.checkpoints[i]
        assert start == c.compressed - (1 if c.bits else 0)
        ends.append(end)
        assert digest == "sha256:" + hashlib.sha256(blob[start:end]).hexdigest(), i
    assert ends[-1] == len(blob) and ends[:-1] == [c.compressed for c in z.checkpoints[1:]]


def test_round_trips_through_us_and_through_flatc(layer):
    data = layer["data"]
    assert ztoc.encode(ztoc.decode(data, "t")) == data
    doc = flatc_json(layer["tmp"], data, "rt")
    again = flatc_binary(layer["tmp"], doc, "rt2")
    assert ztoc.decode(again, "flatc") == layer["z"]
    assert ztoc.to_entries(ztoc.decode(again, "flatc"), "t") == ztoc.to_entries(layer["z"], "t")


def test_each_checkpoint_inflates_with_plain_zlib(layer):
    z, blob, tar = layer["z"], layer["blob"], layer["tar"]
    for c in z.checkpoints:
        assert realigned_inflate(blob, c, 4096) == tar[c.uncompressed:c.uncompressed + 4096], c
    blob_again, span = zinfo.unpack(zinfo.pack(z.checkpoints, z.span_size))
    assert tuple(blob_again) == z.checkpoints and span == SPAN


def test_random_access_through_the_gzidx_returns_the_tar(layer):
    z, blob, tar = layer["z"], layer["blob"], layer["tar"]
    spans = [(0, "", ztoc.span_range(z, 0)[0])]
    spans += [(*ztoc.span_range(z, i), d.partition(":")[2]) for i, d in enumerate(z.span_digests)]
    spans = [spans[0]] + [(s, d, e) for s, e, d in spans[1:]]
    fetched = []

    def fetch(start, end):
        fetched.append((start, end))
        return blob[start:end], False

    reader = zran.RandomAccess(zran.SpanFile(len(blob), spans, fetch, "test"), zlib.compress(ztoc.to_gzidx(z)))
    rnd = random.Random(11)
    offsets = [rnd.randrange(len(tar)) for _ in range(60)]
    offsets += [c.uncompressed + d for c in z.checkpoints if c.bits for d in (0, 1, 7, 513)]
    offsets += [0, len(tar) - 1000]
    for offset in offsets:
        assert reader.pread(offset, 3000) == tar[offset:offset + 3000], offset
    assert fetched, "the reads went through the spans"


def test_entries_follow_the_tar_rules(layer):
    entries, skipped = ztoc.to_entries(layer["z"], "test")
    by = {e.path: e for e in entries}
    assert skipped == 1 and "../escape" not in by and "escape" not in by
    assert by[""].kind == DIR and by["etc"].kind == DIR and "./etc" not in by
    assert by["tmp"].mode == 0o1777 and by["usr/bin/su"].mode == 0o4755 and by["usr/bin/wall"].mode == 0o2755
    hello, hard = by["etc/hello"], by["etc/hard"]
    assert hard.kind == FILE and hard.link == hello.link >= 0 and hard.offset == hello.offset
    assert (hello.uid, hello.gid) == (1000, 100)
    assert layer["tar"][hello.offset:hello.offset + hello.size] == b"hello\n"
    assert by["etc/link"].kind == SYMLINK and by["etc/link"].target == "hello"
    assert by["dev/null"].kind == CHAR and by["dev/null"].rdev == os.makedev(1, 3)
    assert by["dev/sda"].kind == BLOCK and by["dev/sda"].rdev == os.makedev(8, 0)
    assert by["run/fifo"].kind == FIFO
    assert dict(by["usr/xattr"].xattrs) == {"user.comment": b"hi", "trusted.x": b"y"}
    assert by["usr/nsec"].mtime == 1_700_000_000_123_456_789 and hello.mtime == 1_700_000_000 * 10**9
    y = by["x/y"]
    assert layer["tar"][y.offset:y.offset + y.size] == b"second wins", "the last duplicate wins"


# -- what is refused ----------------------------------------------------------------------------------


def refused(data: bytes) -> str:
    with pytest.raises(InvalidZtoc) as caught:
        ztoc.decode(data, "bad")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("bad: zTOC")
    return message


def test_truncated_and_garbage_are_refused(layer):
    data = layer["data"]
    for n in (0, 3, 7, 64, len(data) // 2, len(data) - 1):
        refused(data[:n])
    refused(b"\xff" * 64)


@pytest.mark.parametrize("change, says", [
    (lambda z: dataclasses.replace(z, checkpoints=(*z.checkpoints[:-1], dataclasses.replace(z.checkpoints[-1], bits=9))),
     "bits is over 7"),
    (lambda z: dataclasses.replace(z, checkpoints=(*z.checkpoints[:-1], dataclasses.replace(
        z.checkpoints[-1], compressed=z.compressed_size + 10))), "past the end"),
    (lambda z: dataclasses.replace(z, checkpoints=(*z.checkpoints[:-1], dataclasses.replace(
        z.checkpoints[-1], uncompressed=z.uncompressed_size + 1))), "past the end"),
    (lambda z: dataclasses.replace(z, checkpoints=(z.checkpoints[1], z.checkpoints[0], *z.checkpoints[2:])),
     "does not follow"),
    (lambda z: dataclasses.replace(z, span_digests=z.span_digests[:-1]), "disagree"),
    (lambda z: dataclasses.replace(z, span_digests=("sha256:abc",) + z.span_digests[1:]), "is not sha256:<64 hex>"),
    (lambda z: dataclasses.replace(z, members=(dataclasses.replace(z.members[2], offset=z.uncompressed_size),)
                                   + z.members), "outside"),
    (lambda z: dataclasses.replace(z, members=(dataclasses.replace(z.members[2], type="sparse"),)), "has type"),
], ids=["bits=9", "checkpoint-past-blob", "checkpoint-past-tar", "unordered", "counts", "digest", "member-offset", "type"])
def test_bad_values_are_refused(layer, change, says):
    assert says in refused(ztoc.encode(change(layer["z"])))


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["compression_info"].update(max_span_id=d["compression_info"]["max_span_id"] + 1), "disagree"),
    (lambda d: d["compression_info"].update(compression_algorithm="Uncompressed"), "is not gzip"),
    (lambda d: d["compression_info"].update(checkpoints=d["compression_info"]["checkpoints"][:-5]),
     "does not hold the"),
    (lambda d: d["compression_info"].update(checkpoints=[1, 0, 0, 0] + [0] * 8 + [0] * 17 + [0] * 1000),
     "does not hold the"),  # a window that is not 32 KiB
    (lambda d: d.pop("toc"), "no TOC"),
], ids=["max_span_id", "algorithm", "blob-length", "window", "no-toc"])
def test_flatc_made_inconsistencies_are_refused(layer, edit, says):
    doc = flatc_json(layer["tmp"], layer["data"], "edit")
    edit(doc)
    assert says in refused(flatc_binary(layer["tmp"], doc, "edited"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_ztocs_only_ever_raise_invalid_ztoc(small, data):
    buf = bytearray(small)
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf)))]
    for _ in range(data.draw(st.integers(0, 8))):
        if buf:
            # headers and tables are at both ends: aim there more than at the windows in the middle
            i = data.draw(st.one_of(st.integers(0, min(len(buf) - 1, 2048)),
                                    st.integers(max(0, len(buf) - 4096), len(buf) - 1),
                                    st.integers(0, len(buf) - 1)))
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        z = ztoc.decode(bytes(buf), "fuzz")
    except InvalidZtoc as exc:
        assert "\n" not in str(exc)
        return
    ztoc.to_entries(z, "fuzz")
    ztoc.to_gzidx(z)
