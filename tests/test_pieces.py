"""Verified pieces (gzip spans, eStargz chunks) outlive the mount: a file read lazily once is read
again on the next mount without the registry — and a piece the disk spoiled is never served."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imagefs import gc
from imagefs.content import pieces
from imagefs.content.local import LocalStore
from imagefs.layers import entries
from imagefs.testing import estargz
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support.mounting import Mount
from tests.test_estargz import CHUNK, base_tar

BIG = im.random_bytes(10 << 20, 31)
MIB = 1 << 20


class PieceImages:
    def __init__(self, registry) -> None:
        self.gz = im.tar_layer({"etc/small": b"small file\n", "opt/big": BIG})
        push(registry.host, "pieces/gzip", im.image([self.gz]), "v1")
        self.stargz = estargz.layer(base_tar(), chunk_size=CHUNK)
        push(registry.host, "pieces/estargz", im.image([self.stargz]), "v1")


@pytest.fixture(scope="module")
def pimages(registry) -> PieceImages:
    return PieceImages(registry)


def kept(cache_dir, layer: im.Blob) -> list:
    d = pieces.layer_dir(cache_dir, layer.digest)
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def imagefs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagefs", *args], capture_output=True, text=True, timeout=120)


def test_gzip_spans_read_after_eviction_are_kept_for_the_next_mount(registry, proxy, pimages, tmp_path, cache_dir):
    ref, layer = f"{proxy.host}/pieces/gzip:v1", pimages.gz
    with Mount(ref, tmp_path / "m1", cache_dir, "--index"):
        assert entries.index_path(cache_dir, layer.digest).exists()
    (cache_dir / "blobs" / "sha256" / layer.digest.partition(":")[2]).unlink()
    assert kept(cache_dir, layer) == [], "nothing is kept while the whole blob is here"

    proxy.reset()
    with Mount(ref, tmp_path / "m2", cache_dir) as m:
        assert m.path("rootfs/etc/small").read_bytes() == b"small file\n"
        with open(m.path("rootfs/opt/big"), "rb") as f:
            assert os.pread(f.fileno(), 4096, 6 * MIB) == BIG[6 * MIB : 6 * MIB + 4096]
        fetched = proxy.bytes_sent(layer.digest)
        assert 0 < fetched < layer.size
    spans = kept(cache_dir, layer)
    assert spans and sum(p.stat().st_size for p in spans) == fetched  # exactly what was fetched, verified
    assert all(im.digest_of(p.read_bytes()) == f"sha256:{p.name}" for p in spans)

    proxy.reset()
    with Mount(ref, tmp_path / "m3", cache_dir) as m:
        assert m.path("rootfs/etc/small").read_bytes() == b"small file\n"
        with open(m.path("rootfs/opt/big"), "rb") as f:
            assert os.pread(f.fileno(), 4096, 6 * MIB) == BIG[6 * MIB : 6 * MIB + 4096]
        assert proxy.matching(f"/blobs/{layer.digest}") == [], "read again with no registry request"

    # A piece the disk spoiled is caught on load, removed, fetched again, and the reader never notices.
    spoiled = spans[0]
    raw = bytearray(spoiled.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    spoiled.write_bytes(bytes(raw))
    fsck = imagefs("fsck", "--cache-dir", str(cache_dir))
    assert fsck.returncode == 1 and spoiled.name in fsck.stdout, fsck.stdout + fsck.stderr
    proxy.reset()
    with Mount(ref, tmp_path / "m4", cache_dir) as m:
        assert m.path("rootfs/etc/small").read_bytes() == b"small file\n"
        with open(m.path("rootfs/opt/big"), "rb") as f:
            assert os.pread(f.fileno(), 4096, 6 * MIB) == BIG[6 * MIB : 6 * MIB + 4096]
        assert 0 < proxy.bytes_sent(layer.digest) == spoiled.stat().st_size  # that one span, and no more
        assert "does not match its digest" in m.log_text()
    assert im.digest_of(spoiled.read_bytes()) == f"sha256:{spoiled.name}", "replaced by the right bytes"
    assert imagefs("fsck", "--cache-dir", str(cache_dir)).returncode == 0

    # `ls` counts them; once the whole blob is back, gc drops them as redundant.
    ls = json.loads(imagefs("ls", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert ls["pieces"] == len(spans) and ls["piece_bytes"] == fetched
    pull = imagefs("pull", ref, "--plain-http", "--cache-dir", str(cache_dir))
    assert pull.returncode == 0, pull.stderr
    gc = imagefs("gc", "--cache-dir", str(cache_dir))
    assert gc.returncode == 0 and f"pieces layer-{layer.digest}" in gc.stdout and "its blob is committed" in gc.stdout
    assert kept(cache_dir, layer) == []


def test_estargz_chunks_are_kept_for_the_next_mount(registry, proxy, pimages, tmp_path, cache_dir):
    ref, layer = f"{proxy.host}/pieces/estargz:v1", pimages.stargz
    with Mount(ref, tmp_path / "m1", cache_dir) as m:
        with open(m.path("rootfs/opt/big"), "rb") as f:
            first = os.pread(f.fileno(), 4096, 3 * CHUNK + 5)
        assert m.path("rootfs/etc/os-release").read_bytes() == b'NAME="estargz test"\n'
    chunks = kept(cache_dir, layer)
    assert len(chunks) >= 2 and all(im.digest_of(p.read_bytes()) == f"sha256:{p.name}" for p in chunks)
    assert not (cache_dir / "blobs" / "sha256" / layer.digest.partition(":")[2]).exists()

    proxy.reset()
    with Mount(ref, tmp_path / "m2", cache_dir) as m:
        with open(m.path("rootfs/opt/big"), "rb") as f:
            assert os.pread(f.fileno(), 4096, 3 * CHUNK + 5) == first
        assert m.path("rootfs/etc/os-release").read_bytes() == b'NAME="estargz test"\n'
        assert proxy.matching(f"/blobs/{layer.digest}") == [], "listed from the cached TOC, read from kept chunks"

    # gc keeps them while an image references the layer, and drops them with its last reference.
    store = LocalStore(cache_dir)
    assert not [r for r in gc.collect(store, grace=0).removed if r.kind == "pieces"]
    assert kept(cache_dir, layer) == chunks
    evict = gc.collect(store, grace=0, max_size=0, dry_run=True)  # --max-size counts and evicts them too
    assert [(r.name, r.reason.split(":")[0]) for r in evict.removed if r.kind == "pieces"] == [
        (f"layer-{layer.digest}", "evicted")]
    for blob in store.blobs.iterdir():  # forget the image: no root, so nothing references the layer
        blob.unlink()
    assert gc.collect(store, grace=60).count("pieces") == 0, "too young: a mount may be adding to them"
    result = gc.collect(store, grace=0)
    assert [(r.kind, r.name, r.reason) for r in result.removed if r.kind == "pieces"] == [
        ("pieces", f"layer-{layer.digest}", "its layer is unreferenced")]
    assert not pieces.layer_dir(cache_dir, layer.digest).exists()
