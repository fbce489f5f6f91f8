"""Issue 14: layers as the real producers write them, mounted for real and compared entry by entry
with ``umoci unpack`` of the same image; what each read costs is counted at the proxy.

- eStargz from stargz-snapshotter's ``estargz`` library;
- zstd:chunked from stargz-snapshotter's compressor, annotated for both readers (``toc.digest``
  *and* ``manifest-checksum`` / ``manifest-position`` on one zstd layer);
- zstd:chunked from skopeo 1.9.3 (containers/storage: a multi-chunk file's first row carries the
  *whole file's* ``endOffset``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import httpx
import pytest

from imagefs.layers import estargz
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support import producers
from tests.support.mounting import Mount
from tests.test_rootfs import snapshot, unpack

KINDS = ["estargz", "stargz-zstdchunked", "skopeo-zstdchunked"]
BIG = {"usr/bin/big-random": 1_300_000}


class ProducerImages:
    def __init__(self, registry) -> None:
        self.host = registry.host
        tar = producers.tree_tar()
        self.tar = tar
        for fmt, repo in (("estargz", "estargz"), ("zstdchunked", "stargz-zstdchunked")):
            layer, diff_id = producers.library_layer(tar, fmt)
            img = im.image([layer])
            assert json.loads(img.config.data)["rootfs"]["diff_ids"] == [diff_id], "the library's own diff_id"
            push(self.host, f"producers/{repo}", img, "v1")
        push(self.host, "producers/plain", im.image([im.Blob(im.OCI_LAYER_GZIP, im.compress(tar, "gzip"))]), "v1")
        producers.skopeo_zstd_chunked(self.host, "producers/plain", "producers/skopeo-zstdchunked")

    def layer(self, kind: str) -> dict:
        """The pushed manifest's (only) layer descriptor, as the registry serves it."""
        resp = httpx.get(f"http://{self.host}/v2/producers/{kind}/manifests/v1",
                         headers={"Accept": f"{im.OCI_MANIFEST}, {im.DOCKER_MANIFEST}"})
        return resp.json()["layers"][0]


@pytest.fixture(scope="module")
def pimages(registry) -> ProducerImages:
    return ProducerImages(registry)


def toc_start(pimages: ProducerImages, kind: str, layer: dict) -> int:
    """Where the layer's TOC begins: every byte before it is file data."""
    ann = layer.get("annotations", {})
    position = ann.get("io.containers.zstd-chunked.manifest-position")
    if position:
        return int(position.split(":")[0])
    url = f"http://{pimages.host}/v2/producers/{kind}/blobs/{layer['digest']}"
    size = layer["size"]
    tail = httpx.get(url, headers={"Range": f"bytes={size - estargz.FOOTER_SIZE}-{size - 1}"}).content
    return estargz.toc_offset(tail, size)


def test_the_producers_wrote_what_the_issue_describes(pimages):
    both = pimages.layer("stargz-zstdchunked")
    assert both["mediaType"] == im.OCI_LAYER_ZSTD
    assert {"containerd.io/snapshot/stargz/toc.digest", "io.containers.zstd-chunked.manifest-checksum",
            "io.containers.zstd-chunked.manifest-position"} <= set(both["annotations"])
    skopeo = pimages.layer("skopeo-zstdchunked")
    assert skopeo["mediaType"].endswith("zstd") and "io.containers.zstd-chunked.manifest-checksum" in skopeo["annotations"]


@pytest.mark.parametrize("kind", KINDS)
def test_rootfs_equals_umoci_unpack(registry, proxy, pimages, kind, tmp_path, mnt, cache_dir):
    # umoci 0.4 cannot inflate zstd. skopeo's layer is checked against the tar it was made from;
    # stargz's against its eStargz of the same tar (the same members, landmark included), less the
    # TOC member only eStargz has.
    reference = "plain" if kind == "skopeo-zstdchunked" else "estargz"
    want = snapshot(unpack(registry, f"producers/{reference}", tmp_path))
    if kind == "stargz-zstdchunked":
        del want["stargz.index.json"]
    layer = pimages.layer(kind)
    start = toc_start(pimages, kind, layer)
    with Mount(f"{proxy.host}/producers/{kind}:v1", mnt, cache_dir) as m:
        proxy.reset()
        listing = subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, text=True, check=True)
        assert "big-random" in listing.stdout
        listed = proxy.bytes_sent(layer["digest"])
        assert 0 < listed <= layer["size"] - start + (64 << 10), "listing costs the footer and the TOC only"
        got = snapshot(m.path("rootfs"))  # reads every file
        whole = proxy.bytes_sent(layer["digest"])
        log = m.log_text()
    differ = sorted((k, got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    assert differ == []
    assert whole <= 1.05 * layer["size"], f"a whole-tree read fetched {whole / layer['size']:.2f}x the blob"
    assert "indexing it as a plain layer" not in log and "Traceback" not in log


@pytest.mark.parametrize("kind", KINDS)
def test_one_file_costs_its_own_chunks(proxy, pimages, kind, mnt, cache_dir):
    layer = pimages.layer(kind)
    start = toc_start(pimages, kind, layer)
    with Mount(f"{proxy.host}/producers/{kind}:v1", mnt, cache_dir) as m:
        proxy.reset()
        data = m.path("rootfs/usr/bin/big-random").read_bytes()
        cost = proxy.bytes_sent(layer["digest"])
    assert len(data) == BIG["usr/bin/big-random"]
    with_toc = layer["size"] - start + (64 << 10)
    assert cost <= 1.1 * len(data) + with_toc, f"{cost} bytes for a {len(data)}-byte incompressible file"


def test_sub_second_and_exact_mtimes_survive(pimages, mnt, cache_dir, registry):
    """The producers keep whole seconds; the mount shows exactly those (no float drift)."""
    with Mount(f"{registry.host}/producers/skopeo-zstdchunked:v1", mnt, cache_dir) as m:
        st = m.path("rootfs/usr/bin/big-text").stat()
    assert st.st_mtime_ns == (1_700_000_000 + len("usr/bin/big-text")) * 10**9


def test_a_tampered_toc_digest_on_a_dual_annotated_layer_is_refused(registry, pimages, mnt, cache_dir):
    """Both annotations are checked on a zstd layer: a wrong toc.digest alone refuses the TOC."""
    layer, _ = producers.library_layer(pimages.tar, "zstdchunked")
    ann = dict(layer.annotations)
    ann["containerd.io/snapshot/stargz/toc.digest"] = "sha256:" + hashlib.sha256(b"not it").hexdigest()
    bad = im.Blob(layer.media_type, layer.data, annotations=tuple(sorted(ann.items())))
    push(registry.host, "producers/tampered", im.image([bad]), "v1")
    with Mount(f"{registry.host}/producers/tampered:v1", mnt, cache_dir) as m:
        with pytest.raises(OSError):
            m.path("rootfs/usr/bin/big-text").read_bytes()
        log = m.log_text()
    assert "toc.digest" in log and "refusing" in log
