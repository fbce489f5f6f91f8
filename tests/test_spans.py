"""Issue 11: where a gzip layer's checkpoints go (layers/spans.py) and the one local pass (layers/gzpass.py).

A file of <= 4 KiB read from a layer whose blob is not here costs <= 512 KiB of the layer, counted
at the proxy: through the local index after eviction, and on a second machine through a zTOC that
``copy --soci`` wrote with its defaults, which stays <= 3 % of the layer. The local pass inflates a
layer once (its statistics record) and what it builds is checked by tarfile, hashlib and zlib.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import subprocess
import tarfile

import pytest
import trio

from imagefs.content import LocalStore
from imagefs.descriptors import Descriptor
from imagefs.errors import InvalidLayer
from imagefs.layers import entries, gzindex, gzpass, service, spans, zran
from imagefs.layers.service import Layers
from imagefs.layers.spans import DataRanges, Point
from imagefs.testing import images as im
from imagefs.reader import BlobReader
from imagefs.testing.push import push
from tests.support.mounting import IMAGEFS, Mount
from tests.test_handlers import MemoryFetcher
from tests.test_soci import text

KIB, MIB = 1 << 10, 1 << 20
TARGET = 512 * KIB


# -- the rule, on made-up offsets ---------------------------------------------------------------------


def ranges_of(files: list[tuple[int, int]]) -> DataRanges:
    r = DataRanges()
    for start, size in files:
        r.add(start, size)
    return r


def spans_of(chosen: list[Point]) -> list[tuple[Point, Point]]:
    return list(zip(chosen, chosen[1:]))


def test_small_files_get_dense_spans_and_a_big_file_sparse_ones():
    # 2 MiB of 3 KiB files (tar headers between them), then one 64 MiB file, then small files again;
    # compressed = uncompressed / 2; a candidate every 32 KiB of compressed bytes
    files, pos = [], 0
    while pos < 2 * MIB:
        files.append((pos + 512, 3 * KIB))
        pos += 512 + 3 * KIB + 512
    big = (pos + 512, 64 * MIB)
    files.append(big)
    pos = big[0] + big[1]
    tail = pos
    while pos < tail + 2 * MIB:
        files.append((pos + 512, 3 * KIB))
        pos += 512 + 3 * KIB + 512
    ranges = ranges_of(files)
    points = [Point(u // 2, u) for u in range(64 * KIB, pos, 64 * KIB)]
    chosen = spans.choose(points, Point(10, 0), ranges, spans.DENSE)
    for a, b in spans_of(chosen):
        if ranges.touches_small(a.uncompressed, b.uncompressed):
            assert b.compressed - a.compressed <= spans.DENSE, (a, b)
        else:
            assert b.compressed - a.compressed <= spans.SPARSE, (a, b)
    inside = [(a, b) for a, b in spans_of(chosen) if ranges.inside_one(a.uncompressed, b.uncompressed)]
    assert inside and max(b.compressed - a.compressed for a, b in inside) > 8 * MIB, "the big file gets big spans"
    # 1 MiB of small files compressed on either side at <= 512 KiB, 32 MiB of one file at <= 16 MiB
    assert len(chosen) <= 2 * 3 + 32 * MIB // spans.SPARSE + 3
    for c in chosen[1:]:
        assert not ranges.splits_small(c.uncompressed), "a clean candidate was always at hand"


def test_a_cut_inside_a_small_file_only_when_nothing_else_fits():
    # files of 12 KiB back to back: every candidate but a few lies inside one
    files = [(i * 12 * KIB, 12 * KIB) for i in range(400)]
    ranges = ranges_of(files)
    points = [Point(u // 2, u) for u in range(40 * KIB, 400 * 12 * KIB, 40 * KIB)]
    chosen = spans.choose(points, Point(10, 0), ranges, 256 * KIB)
    assert all(b.compressed - a.compressed <= 256 * KIB for a, b in spans_of(chosen)), "the limit holds regardless"
    clean = [c for c in chosen[1:] if not ranges.splits_small(c.uncompressed)]
    assert clean, "where a clean candidate is within the limit it is taken"


def test_the_budget_widens_dense_spans_for_a_layer_of_only_small_files():
    files = [(i * 4 * KIB + 512, 3 * KIB) for i in range(25_000)]  # 100 MiB of small files
    ranges = ranges_of(files)
    points = [Point(u // 4, u) for u in range(32 * KIB, 100 * MIB, 32 * KIB)]
    size = 25 * MIB
    chosen, dense = spans.fit(points, Point(10, 0), ranges, size, toc_bytes=100_000)
    assert dense > spans.DENSE, "at 512 KiB the windows alone are 6 % of the layer"
    assert 100_000 + len(chosen) * spans.CHECKPOINT_BYTES <= spans.BUDGET * size
    unbounded, same = spans.fit(points, Point(10, 0), ranges, size, toc_bytes=100_000, budget=None)
    assert same == spans.DENSE and len(unbounded) > len(chosen)


# -- the one local pass, on a real layer ---------------------------------------------------------------


def mixed_files() -> dict:
    """~7 MiB of small and middling text files around a 24 MiB incompressible file: a layer as
    images have them, with a handful of files <= 4 KiB in every stretch."""
    rng = random.Random(23)
    files: dict = {}
    for i in range(700):
        size = rng.choice([700, 1_500, 3_000, 4_000, 9_000, 20_000, 45_000])
        files[f"usr/share/doc/pkg{i // 50:02d}/f{i:03d}.txt"] = text(rng, size)
        if i == 350:
            files["opt/big.bin"] = im.random_bytes(24 * MIB, seed=4)
    files["etc/os-release"] = b'NAME="spans"\n'
    return files


@pytest.fixture(scope="module")
def mixed() -> im.Blob:
    return im.tar_layer(mixed_files())


def small_names(layer: im.Blob, count: int = 8) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(im.uncompressed(layer))) as t:
        names = [m.name for m in t.getmembers() if m.isreg() and 0 < m.size <= 4096]
    step = max(1, len(names) // count)
    return names[::step][:count]


def test_the_local_pass_inflates_once_and_builds_everything_from_it(mixed, tmp_path):
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(mixed.data)
    tar = im.uncompressed(mixed)
    before = gzpass.statistics()
    index = service.build(str(path), Descriptor(mixed.media_type, mixed.digest, mixed.size))
    after = gzpass.statistics()
    assert after.passes - before.passes == 1, "one inflate, not one for the tar and one for the checkpoints"
    assert after.inflated - before.inflated == len(tar) == index.tar_size, "each tar byte inflated once"
    assert index.uncompressed == "sha256:" + hashlib.sha256(tar).hexdigest(), "the diff_id came from that pass"
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        want = {m.name: m for m in t.getmembers() if m.isreg()}
    got = {e.path: e for e in index.entries}
    for name, m in want.items():
        assert (got[name].offset, got[name].size) == (m.offset_data, m.size), name
    for start, digest, end in index.spans:
        if digest:
            assert hashlib.sha256(mixed.data[start:end]).hexdigest() == digest
    reader = zran.RandomAccess(zran.SpanFile(mixed.size, index.spans, lambda s, e: (mixed.data[s:e], False), "t"),
                               index.zran)
    rng = random.Random(5)
    for offset in [rng.randrange(len(tar) - 5000) for _ in range(40)]:
        assert reader.pread(offset, 5000) == tar[offset:offset + 5000], offset


def _pass(data: bytes, estimate: int, split: bool) -> gzpass.Pass:
    return gzpass.inflate_stream(io.BytesIO(data), len(data), "t", estimate=estimate, progress=False,
                                 index_stream=io.BytesIO(data) if split else None)


@pytest.mark.parametrize("shape", ["one member", "two members", "zero padding", "trailing bytes"])
def test_the_split_pass_zlib_for_the_tar_and_indexed_gzip_for_checkpoints_agrees_with_one_thread(mixed, shape):
    # a mount and copy --soci inflate the tar through zlib in one thread while indexed_gzip places the
    # candidate checkpoints from a second reader of the same bytes in another; the gzip shapes that
    # indexed_gzip reads on its own must give the same tar rows, tar size and diff_id
    tar = im.uncompressed(mixed)
    data = {"one member": mixed.data,
            "two members": gzip.compress(tar[:len(tar) // 3], 1) + gzip.compress(tar[len(tar) // 3:], 1),
            "zero padding": mixed.data + bytes(1000),
            "trailing bytes": mixed.data + b"not gzip"}[shape]
    with _pass(data, len(tar), True) as split, _pass(data, len(tar), False) as one:
        assert split.entries == one.entries
        assert split.tar_size == one.tar_size == len(tar)
        assert split.uncompressed == one.uncompressed == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert len(split.candidates) > 10
        chosen = spans.choose(split.candidates, split.first, split.ranges, 256 * KIB)
        assert len(chosen) > 3
        for c in split.checkpoints(chosen)[1:]:  # each window is the 32 KiB of tar before its point
            assert c.window == tar[c.uncompressed - len(c.window):c.uncompressed], c.uncompressed


def test_the_split_pass_reads_a_second_member_whose_magic_a_read_cut_in_two():
    # the first member ends one byte before a read of the tar side ends: the next read holds the
    # rest of the second member's magic (b"\\x1f" | b"\\x8b..."), which is no trailing garbage
    files = {f"d/f{i}": random.Random(i).randbytes(9000) for i in range(3 * gzpass.READ // 2 // 9000)}
    tar = im.uncompressed(im.tar_layer(files, compression="none"))
    cut = (gzpass.READ - 16384) // 512 * 512
    while len(gzip.compress(tar[:cut + 8192], 1, mtime=0)) < gzpass.READ - 1024:
        cut += 8192  # as near a read's end as keeps room for the name field below
    first = gzip.compress(tar[:cut], 1, mtime=0)
    pad = gzpass.READ - 1 - len(first) - 1  # an FNAME field makes the member exactly READ - 1 bytes
    assert 0 < pad < 60000
    first = first[:3] + bytes([first[3] | 8]) + first[4:10] + b"n" * pad + b"\0" + first[10:]
    assert len(first) == gzpass.READ - 1
    data = first + gzip.compress(tar[cut:], 1, mtime=0)
    with _pass(data, len(tar), True) as split, _pass(data, len(tar), False) as one:
        assert split.tar_size == one.tar_size == len(tar)
        assert split.uncompressed == one.uncompressed == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert split.entries == one.entries and len(split.entries) == len(files) + 1


@pytest.mark.parametrize("after", ["zero padding", "a second member"])
def test_the_split_pass_reads_on_after_a_member_that_ends_where_one_read_inflates_to_several_chunks(after):
    # text compresses ~50x: one read of the blob holds the member's end and what follows it, and
    # inflates to several chunks; zlib then leaves those following bytes in unconsumed_tail as well
    # as unused_data, and reading them from both spun forever (padding) or inflated them twice
    files = {f"t/f{i:03d}": b"line %d of a text file that compresses well\n" % i * 2000 for i in range(100)}
    tar = im.uncompressed(im.tar_layer(files, compression="none"))
    half = len(tar) * 2 // 3  # more than one chunk of output
    data = {"zero padding": gzip.compress(tar, 6, mtime=0) + bytes(1000),
            "a second member": gzip.compress(tar[:half], 6, mtime=0) + gzip.compress(tar[half:], 6, mtime=0)}[after]
    assert len(data) < gzpass.READ and len(tar) > 2 * (4 << 20)
    with _pass(data, len(tar), True) as split, _pass(data, len(tar), False) as one:
        assert split.tar_size == one.tar_size == len(tar)
        assert split.uncompressed == one.uncompressed == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert split.entries == one.entries and len(split.entries) == len(files) + 1


def test_the_split_pass_refuses_what_does_not_inflate_and_keeps_no_diff_id_of_a_cut_stream(mixed):
    tar = im.uncompressed(mixed)
    cut = mixed.data[:len(mixed.data) // 2]
    with _pass(cut, len(tar), True) as p:
        assert p.uncompressed == "", "a stream cut inside its member has no diff_id"
        assert 0 < len(p.entries) < len(tarfile.open(fileobj=io.BytesIO(tar)).getmembers())
    bad = bytearray(mixed.data)
    bad[len(bad) // 3:len(bad) // 3 + 64] = bytes(64)
    with pytest.raises(InvalidLayer):
        _pass(bytes(bad), len(tar), True).close()
    with pytest.raises(InvalidLayer):
        _pass(b"\x1f\x8b\x08\0\0\0\0\0\0\xff" + b"no deflate here" * 100, len(tar), True).close()


def test_span_digests_two_at_a_time_are_each_ranges_sha256(tmp_path):
    data = random.randbytes(3 * MIB + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    ranges = [(0, 10), (9, 1 << 20), (1 << 20, 3 * MIB), (3 * MIB, len(data)), (5, 5)]
    assert gzindex.span_digests(str(path), ranges) == ["sha256:" + hashlib.sha256(data[a:b]).hexdigest() for a, b in ranges]
    assert gzindex.span_digests(str(path), ranges[:1]) == ["sha256:" + hashlib.sha256(data[:10]).hexdigest()]
    with pytest.raises(InvalidLayer):
        gzindex.span_digests(str(path), [(0, 10), (len(data) - 5, len(data) + 5)])


async def test_a_first_look_reads_the_layer_before_its_spans_are_hashed_and_keeps_them_hashed(mixed, tmp_path):
    # the span digests are hashed after the first look is answered (they were 0.3-0.45 s of it on the
    # bench layer): meanwhile reads inflate the committed blob, verified whole; an unmount right after
    # the first read still leaves an index whose every span digest is the sha256 of its bytes
    desc = Descriptor(mixed.media_type, mixed.digest, mixed.size)
    cache = tmp_path / "cache"
    async with trio.open_nursery() as bg:
        layers = Layers(BlobReader(LocalStore(cache), MemoryFetcher({desc.digest: mixed.data}), bg), cache_dir=cache)
        index = await layers.index(desc)
        assert index.spans == [], "the spans are hashed in the background"
        entry = next(e for e in index.entries if e.path == "etc/os-release")
        assert await layers.read(desc, entry, 0, 4096) == b'NAME="spans"\n'
        bg.cancel_scope.cancel()  # an unmount right after the first look
    kept = entries.load(cache, desc.digest)
    built = gzindex.build_index(str(LocalStore(cache).path(desc.digest)), desc.digest, "t")
    assert kept is not None and len(kept.spans) > 3 and kept.entries == index.entries
    assert (kept.spans, kept.zran) == (built.spans, built.zran), "what a build from the committed blob keeps"

    assert kept.spans[0][1] == "", "the gzip header before the first checkpoint"
    for start, digest, end in kept.spans[1:]:
        assert hashlib.sha256(mixed.data[start:end]).hexdigest() == digest

    # the blob gone before its spans were hashed: no index is kept, nor used again by this mount
    cache = tmp_path / "gone"
    async with trio.open_nursery() as bg:
        store = LocalStore(cache)
        layers = Layers(BlobReader(store, MemoryFetcher({desc.digest: mixed.data}), bg), cache_dir=cache)
        await layers.index(desc)
        store.delete(desc.digest)
        await layers.settled()
        assert entries.load(cache, desc.digest) is None and layers.cached(desc) is None
        bg.cancel_scope.cancel()


# -- what a small read costs through a mount, counted at the proxy --------------------------------------


def cat_costs(m: Mount, proxy, layer: im.Blob, names: list[str], files: dict) -> list[int]:
    costs = []
    for name in names:
        proxy.reset()
        out = subprocess.run(["cat", str(m.path("rootfs", name))], capture_output=True, check=True).stdout
        assert out == files[name]
        costs.append(proxy.bytes_sent(layer.digest))
    return costs


def test_a_small_file_read_after_eviction_fetches_at_most_512_kib(registry, proxy, mixed, tmp_path, cache_dir):
    push(registry.host, "spans/plain", im.image([mixed]), "v1")
    ref = f"{proxy.host}/spans/plain:v1"
    with Mount(ref, tmp_path / "m1", cache_dir, "--index"):
        pass
    (cache_dir / "blobs" / "sha256" / mixed.digest.partition(":")[2]).unlink()  # evicted; its index stays
    names = small_names(mixed)
    with Mount(ref, tmp_path / "m2", cache_dir) as m:
        costs = cat_costs(m, proxy, mixed, names, mixed_files())
    # 0: the span came with an earlier file's (and was kept)
    assert all(c <= TARGET for c in costs) and sum(costs) > 0, [c // KIB for c in costs]


def test_a_second_machine_reads_a_small_file_for_at_most_512_kib_of_a_default_ztoc(registry, proxy, mixed, tmp_path,
                                                                                 cache_dir):
    push(registry.host, "spans/plain2", im.image([mixed]), "v1")
    done = subprocess.run([*IMAGEFS, "copy", "--soci", f"{registry.host}/spans/plain2:v1",
                           f"{registry.host}/spans/soci:v1", "--cache-dir", str(tmp_path / "first")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = small_names(mixed)
    proxy.reset()
    with Mount(f"{proxy.host}/spans/soci:v1", tmp_path / "m", cache_dir) as m:
        listing = subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, text=True, check=True)
        assert "big.bin" in listing.stdout
        ztoc_bytes = sum(h.body_bytes for h in proxy.matching("/blobs/", "GET")  # the zTOC, and the config
                         if mixed.digest not in h.path)
        assert proxy.bytes_sent(mixed.digest) == 0, "listing costs the zTOC only"
        costs = cat_costs(m, proxy, mixed, names, mixed_files())
        log = m.log_text()
    assert "listed from zTOC" in log
    assert 0 < ztoc_bytes <= 0.03 * mixed.size, f"zTOC {ztoc_bytes} bytes for a {mixed.size}-byte layer"
    assert all(c <= TARGET for c in costs) and sum(costs) > 0, [c // KIB for c in costs]


def test_an_index_inflated_as_the_blob_arrives_is_kept_only_if_the_blob_matches(registry, proxy, mixed, tmp_path,
                                                                                 cache_dir):
    push(registry.host, "spans/arrive", im.image([mixed]), "v1")
    ref = f"{proxy.host}/spans/arrive:v1"
    hexdigest = mixed.digest.partition(":")[2]
    index = cache_dir / "indexes" / "sha256" / f"{hexdigest}.v3"
    fault = proxy.corrupt(mixed.digest, offset=mixed.size - 100)  # past everything the tar scan needs
    with Mount(ref, tmp_path / "m1", cache_dir) as m:
        with pytest.raises(OSError):
            (m.path("rootfs") / "etc" / "os-release").read_bytes()
        log = m.log_text()
    fault.clear()
    assert not index.exists() and not (cache_dir / "blobs" / "sha256" / hexdigest).exists()
    assert "Traceback" not in log and "inflating it as it arrives" in log
    assert "not a gzip'd tar" not in log, "the reads failed for the digest, and say so"
    with Mount(ref, tmp_path / "m2", cache_dir) as m:
        assert (m.path("rootfs") / "etc" / "os-release").read_bytes() == b'NAME="spans"\n'
        log = m.log_text()
    assert index.exists() and "inflating it as it arrives" in log
