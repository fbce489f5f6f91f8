"""Issue 11: SOCI — zTOCs published next to a plain gzip image, read on first contact.

A "first machine" writes a SOCI-enabled image with ``imagefs copy --soci``; a "second machine"
(a fresh cache) mounts it through the counting proxy and lists and reads it paying for the zTOC
and the spans it reads, never the whole layer. A v1 index is published here by hand (zTOC blobs,
a SOCI index manifest with ``subject``, the ``sha256-<hex>`` referrers tag), and once through a
referrers API the proxy answers, since distribution 2.8 has none. Every tree is compared with
``umoci unpack`` of the plain image.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import random
import re
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest

from imagefs.descriptors import (SOCI_INDEX_DIGEST, SOCI_INDEX_V1, SOCI_INDEX_V2, SOCI_LAYER_DIGEST,
                                 SOCI_MANIFEST_DIGEST)
from imagefs.layers import ztoc
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support.mounting import IMAGEFS, Mount
from tests.test_rootfs import snapshot, unpack

TEST_TIME_LIMIT = 400
SPAN = 256 << 10  # small spans for a small test layer: one file's read stays well under 2 % of it
MIN_LAYER = 1 << 20
ACCEPT = ", ".join([im.OCI_INDEX, im.OCI_MANIFEST, im.DOCKER_MANIFEST, im.DOCKER_MANIFEST_LIST])
OS_RELEASE = b'NAME="soci test"\nID=soci\n'
WORDS = "alpha beta gamma delta layer image registry mount span window inflate deflate tar gzip".split()


def text(rng: random.Random, size: int) -> bytes:
    out = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.randrange(10**6)}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def big_files() -> dict:
    rng = random.Random(11)
    files: dict = {"usr/": im.FileEntry.dir(), "usr/bin/": im.FileEntry.dir(), "tmp/": im.FileEntry.dir(mode=0o1777)}
    for i in range(240):
        files[f"usr/share/doc/pkg{i // 30}/file{i:03d}.txt"] = text(rng, rng.randrange(4_000, 60_000))
        if i == 120:
            files["etc/os-release"] = OS_RELEASE
            files["opt/random.bin"] = im.random_bytes(14 << 20, seed=9)
    files["usr/bin/tool"] = im.FileEntry.file(im.random_bytes(300_000, seed=5), mode=0o4755)
    files["usr/bin/tool-again"] = im.FileEntry.hardlink("usr/bin/tool")
    files["usr/lib/libx.so"] = im.FileEntry.symlink("libx.so.1")
    files["usr/lib/libx.so.1"] = text(rng, 30_000)
    files["./usr/share/dotted.txt"] = b"a name written with ./\n"
    return files


class SociImages:
    def __init__(self, registry, tmp) -> None:
        self.host = registry.host
        self.big = im.tar_layer(big_files())
        self.small = im.tar_layer({"etc/hostname": b"soci\n", im.whiteout("usr/share/doc/pkg0/file000.txt"): b""})
        self.image = im.image([self.big, self.small])
        push(self.host, "soci/plain", self.image, "v1")
        done = subprocess.run([*IMAGEFS, "copy", "--soci", "--soci-span-size", str(SPAN), "--soci-min-layer-size",
                               str(MIN_LAYER), f"{self.host}/soci/plain:v1", f"{self.host}/soci/enabled:v1",
                               "--cache-dir", str(tmp / "first-machine")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        self.copy_out = done
        self.enabled_digest = done.stdout.strip().splitlines()[-1]
        self.layers = self.big.size + self.small.size

    def get(self, repo: str, kind: str, obj: str) -> httpx.Response:
        resp = httpx.get(f"http://{self.host}/v2/{repo}/{kind}/{obj}", headers={"Accept": ACCEPT}, timeout=60)
        assert resp.status_code == 200, (repo, kind, obj, resp.status_code)
        return resp

    def soci_index(self) -> tuple[dict, dict, dict]:
        """(the image index, its image manifest entry, its SOCI index entry) of soci/enabled:v1."""
        index = self.get("soci/enabled", "manifests", "v1").json()
        image = next(m for m in index["manifests"] if m.get("artifactType") != SOCI_INDEX_V2)
        soci = next(m for m in index["manifests"] if m.get("artifactType") == SOCI_INDEX_V2)
        return index, image, soci

    def ztoc_of_big(self) -> tuple[dict, bytes]:
        _, _, soci = self.soci_index()
        layers = self.get("soci/enabled", "manifests", soci["digest"]).json()["layers"]
        desc = next(d for d in layers if d["annotations"][SOCI_LAYER_DIGEST] == self.big.digest)
        return desc, self.get("soci/enabled", "blobs", desc["digest"]).content


@pytest.fixture(scope="module")
def soci(registry, tmp_path_factory) -> SociImages:
    return SociImages(registry, tmp_path_factory.mktemp("soci"))


def layer_bytes(proxy, images: SociImages) -> int:
    return proxy.bytes_sent(images.big.digest) + proxy.bytes_sent(images.small.digest)


# -- writing ----------------------------------------------------------------------------------------


def test_copy_soci_writes_a_soci_enabled_image(soci, tmp_path):
    index, image, entry = soci.soci_index()
    assert soci.enabled_digest == "sha256:" + hashlib.sha256(
        soci.get("soci/enabled", "manifests", "v1").content).hexdigest(), "the digest printed is what DEST's tag names"
    assert index["mediaType"] == im.OCI_INDEX and len(index["manifests"]) == 2
    assert entry["platform"] == image["platform"] and entry["annotations"][SOCI_MANIFEST_DIGEST] == image["digest"]
    manifest = soci.get("soci/enabled", "manifests", image["digest"]).json()
    assert manifest["mediaType"] == im.OCI_MANIFEST and manifest["annotations"][SOCI_INDEX_DIGEST] == entry["digest"]
    assert [layer["digest"] for layer in manifest["layers"]] == [soci.big.digest, soci.small.digest], "the same layer blobs"
    soci_manifest = soci.get("soci/enabled", "manifests", entry["digest"]).json()
    assert soci_manifest["config"]["mediaType"] == SOCI_INDEX_V2
    assert [d["annotations"][SOCI_LAYER_DIGEST] for d in soci_manifest["layers"]] == [soci.big.digest], \
        "the small layer gets no zTOC"
    assert "no zTOC" in soci.copy_out.stderr and "-> zTOC" in soci.copy_out.stderr
    # skopeo checks every digest of the new graph, SOCI index and zTOC included
    subprocess.run(["skopeo", "copy", "-q", "--all", "--src-tls-verify=false", f"docker://{soci.host}/soci/enabled:v1",
                    f"oci:{tmp_path / 'oci'}:v1"], check=True, capture_output=True, timeout=120)


def test_the_ztoc_agrees_with_flatc_and_tarfile(soci, tmp_path):
    desc, data = soci.ztoc_of_big()
    path = tmp_path / "layer.ztoc"
    path.write_bytes(data)
    schema = Path(__file__).parent / "support" / "ztoc.fbs"
    subprocess.run(["flatc", "--json", "--strict-json", "--raw-binary", "-o", str(tmp_path), str(schema), "--", str(path)],
                   check=True, capture_output=True, timeout=60)
    decoded = json.loads((tmp_path / "layer.json").read_text())
    rows = {m["name"]: m for m in decoded["toc"]["metadata"]}
    tar = im.uncompressed(soci.big)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
    assert len(rows) == len(members)
    for m in members:
        row = rows[m.name]
        assert row.get("uncompressed_size", 0) == (m.size if m.isreg() else 0), m.name
        if m.isreg() and m.size:
            assert row["uncompressed_offset"] == m.offset_data, m.name
        assert row.get("mode", 0) & 0o7777 == m.mode & 0o7777, m.name
    info = decoded["compression_info"]
    # dense spans over the text files, one or two inside the 14 MiB random.bin (layers/spans.py)
    assert len(info["span_digests"]) == info.get("max_span_id", 0) + 1 > 5
    assert decoded["compressed_archive_size"] == soci.big.size
    assert len(data) <= 0.2 * soci.big.size


# -- reading: the second machine ---------------------------------------------------------------------


def test_second_machine_lists_and_reads_for_a_sliver_of_the_layers(soci, proxy, mnt, cache_dir):
    with Mount(f"{proxy.host}/soci/enabled:v1", mnt, cache_dir) as m:
        proxy.reset()
        listing = subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, text=True, check=True)
        assert "random.bin" in listing.stdout and "file001.txt" in listing.stdout
        assert not m.path("rootfs/usr/share/doc/pkg0/file000.txt").exists(), "the upper layer's whiteout applies"
        assert m.path("rootfs/etc/os-release").read_bytes() == OS_RELEASE
        cost = layer_bytes(proxy, soci)
        desc, _ = soci.ztoc_of_big()
        ztoc_cost = proxy.bytes_sent(desc["digest"])
        log = m.log_text()
    assert cost - soci.small.size < 0.02 * soci.big.size, f"{cost} layer bytes for ls -lR + cat"
    assert ztoc_cost == desc["size"], "the zTOC is fetched once, whole"
    assert "listed from zTOC" in log and "SOCI index v2" in log
    assert f"indexing {'layer-' + soci.big.digest}" not in log


def test_second_machine_sees_what_umoci_unpacks(soci, registry, proxy, mnt, cache_dir, tmp_path):
    want = snapshot(unpack(registry, "soci/plain", tmp_path))
    with Mount(f"{proxy.host}/soci/enabled:v1", mnt, cache_dir) as m:
        got = snapshot(m.path("rootfs"))
        log = m.log_text()
    differ = sorted((k, got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    assert differ == []
    assert "listed from zTOC" in log and "Traceback" not in log


def test_a_remount_lists_with_no_registry_request(soci, proxy, mnt, cache_dir):
    with Mount(f"{proxy.host}/soci/enabled:v1", mnt, cache_dir) as m:
        subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, check=True)
    with Mount(f"{proxy.host}/soci/enabled:v1", mnt, cache_dir) as m:
        proxy.reset()
        subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, check=True)
        blobs = [h for h in proxy.matching("/blobs/") if h.method == "GET"]
    assert blobs == [], "the zTOC-built index is cached: listing needs nothing from the registry"


def test_a_small_read_after_eviction_costs_its_spans(soci, proxy, mnt, cache_dir):
    """First contact with nothing but the zTOC: each small file costs the span (or two) it sits in."""
    with Mount(f"{proxy.host}/soci/enabled:v1", mnt, cache_dir) as m:
        subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, check=True)
        costs = []
        for i in (3, 77, 150, 233):
            proxy.reset()
            name = f"usr/share/doc/pkg{i // 30}/file{i:03d}.txt"
            data = m.path("rootfs", name).read_bytes()
            assert len(data) > 0
            costs.append(proxy.bytes_sent(soci.big.digest))
    assert all(0 < c <= 2 * SPAN + (64 << 10) for c in costs), costs


def test_a_span_that_does_not_match_its_digest_is_eio(soci, proxy, mnt, cache_dir):
    desc, data = soci.ztoc_of_big()
    z = ztoc.decode(data, "test")
    with Mount(f"{proxy.host}/soci/enabled:v1", mnt, cache_dir) as m:
        subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, check=True)
        entry = next(e for e in ztoc.to_entries(z, "test")[0] if e.path == "etc/os-release")
        span = max(i for i in range(len(z.span_digests)) if ztoc.span_range(z, i)[0] <= entry.offset)
        start, end = ztoc.span_range(z, span)
        proxy.corrupt(soci.big.digest, offset=(start + end) // 2)
        with pytest.raises(OSError) as caught:
            m.path("rootfs/etc/os-release").read_bytes()
        assert caught.value.errno == errno.EIO
        proxy.clear_faults()
        log = m.log_text()
    assert "do not match" in log
    span_digest = z.span_digests[span].partition(":")[2]
    assert not (cache_dir / "pieces" / "sha256" / soci.big.digest.partition(":")[2] / span_digest).exists(), \
        "the corrupt span is not kept"


@pytest.mark.parametrize("flag", ["--strict", "--no-remote-index"])
def test_strict_uses_no_remote_index_and_no_remote_index_refuses_only_v1(soci, proxy, mnt, cache_dir, flag):
    desc, _ = soci.ztoc_of_big()
    with Mount(f"{proxy.host}/soci/enabled:v1", mnt, cache_dir, flag) as m:
        proxy.reset()
        assert m.path("rootfs/etc/os-release").read_bytes() == OS_RELEASE
        got = proxy.bytes_sent(desc["digest"])
        whole = proxy.bytes_sent(soci.big.digest)
    if flag == "--strict":
        assert got == 0 and whole >= soci.big.size, "--strict: no zTOC, the layer indexed locally"
    else:
        assert got == desc["size"] and whole < soci.big.size, "v2 is bound to the image: still used"


# -- v1: referrers ---------------------------------------------------------------------------------


def publish_v1(host: str, repo: str, image: im.Image, ztocs: dict[str, bytes], *, tag: bool = True) -> tuple[im.Blob, im.Blob]:
    """A SOCI index v1 for ``image`` in ``repo``: its zTOCs, the index manifest (``subject``), and
    (with ``tag``) the referrers tag holding an index that lists it. Returns (SOCI manifest, referrers index)."""
    config = im.Blob(SOCI_INDEX_V1, b"{}")
    blobs = {layer: im.Blob("application/octet-stream", data) for layer, data in ztocs.items()}
    doc = {"schemaVersion": 2, "mediaType": im.OCI_MANIFEST, "config": config.descriptor(),
           "layers": [b.descriptor(annotations={SOCI_LAYER_DIGEST: layer, "com.amazon.soci.image-layer-mediaType": im.OCI_LAYER_GZIP})
                      for layer, b in blobs.items()],
           "subject": image.manifest.descriptor(), "annotations": {"com.amazon.soci.build-tool-identifier": "test"}}
    manifest = im.Blob(im.OCI_MANIFEST, json.dumps(doc).encode(), refs=(config, *blobs.values()))
    push(host, repo, manifest, None)
    referrers = im.Blob(im.OCI_INDEX, json.dumps({"schemaVersion": 2, "mediaType": im.OCI_INDEX, "manifests": [
        manifest.descriptor(artifactType=SOCI_INDEX_V1)]}).encode())
    if tag:
        httpx.put(f"http://{host}/v2/{repo}/manifests/sha256-{image.manifest.digest.partition(':')[2]}",
                  content=referrers.data, headers={"Content-Type": im.OCI_INDEX}).raise_for_status()
    return manifest, referrers


@pytest.fixture(scope="module")
def v1(soci) -> dict:
    desc, data = soci.ztoc_of_big()
    push(soci.host, "soci/v1", soci.image, "v1")
    publish_v1(soci.host, "soci/v1", soci.image, {soci.big.digest: data})
    return {"ztoc": desc, "data": data}


def test_v1_found_through_the_referrers_tag(soci, v1, proxy, mnt, cache_dir, registry, tmp_path):
    with Mount(f"{proxy.host}/soci/v1:v1", mnt, cache_dir) as m:
        proxy.reset()
        subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, check=True)
        assert m.path("rootfs/etc/os-release").read_bytes() == OS_RELEASE
        cost = layer_bytes(proxy, soci)
        log = m.log_text()
    assert cost - soci.small.size < 0.02 * soci.big.size
    assert re.search(r"SOCI index v1 sha256:[0-9a-f]{64}, from the referrers tag sha256-", log), log


def test_no_remote_index_refuses_a_v1_referrer(soci, v1, proxy, mnt, cache_dir):
    with Mount(f"{proxy.host}/soci/v1:v1", mnt, cache_dir, "--no-remote-index") as m:
        proxy.reset()
        assert m.path("rootfs/etc/os-release").read_bytes() == OS_RELEASE
        log = m.log_text()
    assert proxy.bytes_sent(v1["ztoc"]["digest"]) == 0 and not proxy.matching("/referrers/")
    assert "zTOC" not in log


def test_v1_found_through_the_referrers_api(soci, v1, proxy, mnt, cache_dir):
    push(soci.host, "soci/api", soci.image, "v1")
    manifest, referrers = publish_v1(soci.host, "soci/api", soci.image, {soci.big.digest: v1["data"]}, tag=False)
    fake = proxy.respond(rf"/v2/soci/api/referrers/{soci.image.manifest.digest}", 200, referrers.data,
                         {"Content-Type": im.OCI_INDEX}, method="GET")
    with Mount(f"{proxy.host}/soci/api:v1", mnt, cache_dir) as m:
        subprocess.run(["ls", "-lR", f"{m.path('rootfs')}/"], capture_output=True, check=True)
        log = m.log_text()
        asked = proxy.matching("/referrers/")
    fake.clear()
    assert asked and "artifactType=application%2Fvnd.amazon.soci.index.v1%2Bjson" in asked[0].path
    assert f"SOCI index v1 {manifest.digest}, from the referrers API" in log


def test_a_ztoc_with_a_bad_offset_falls_back_with_one_log_line(soci, v1, proxy, mnt, cache_dir, registry, tmp_path):
    z = ztoc.decode(v1["data"], "test")
    members = list(z.members)
    members[0] = dataclasses.replace(members[0], offset=z.uncompressed_size + 4096)
    bad = ztoc.encode(dataclasses.replace(z, members=tuple(members) if isinstance(z.members, tuple) else members))
    push(soci.host, "soci/bad", soci.image, "v1")
    publish_v1(soci.host, "soci/bad", soci.image, {soci.big.digest: bad})
    want = snapshot(unpack(registry, "soci/plain", tmp_path))
    with Mount(f"{proxy.host}/soci/bad:v1", mnt, cache_dir) as m:
        got = snapshot(m.path("rootfs"))
        log = m.log_text()
    assert got == want, "the local pass lists it instead"
    refused = [line for line in log.splitlines() if "is refused" in line]
    assert len(refused) == 1 and "indexing the layer locally" in refused[0], log
    assert "Traceback" not in log
