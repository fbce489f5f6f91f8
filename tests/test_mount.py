"""Issue 2 end to end: a real registry, a real FUSE mount, real programs reading through it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagefs.testing import images as im
from tests.support.mounting import Mount, imagefs

AMD64 = ("--platform", "linux/amd64")


def ref_key(blob: im.Blob) -> str:
    mt = blob.media_type
    if mt in (im.OCI_MANIFEST, im.DOCKER_MANIFEST):
        return f"manifest-{blob.digest}"
    if mt in (im.OCI_INDEX, im.DOCKER_MANIFEST_LIST):
        return f"index-{blob.digest}"
    if mt in (im.OCI_CONFIG, im.DOCKER_CONFIG):
        return f"config-{blob.digest}"
    if "layer" in mt or "rootfs" in mt:
        return f"layer-{blob.digest}"
    return f"unknown-{blob.digest}"


def entry_key(entry: dict) -> str:
    return ref_key(im.Blob(entry["mediaType"], b"")).split("-")[0] + "-" + entry["digest"]


def children_keys(blob: im.Blob) -> list[str]:
    doc = json.loads(blob.data)
    if "manifests" in doc:
        return [entry_key(m) for m in doc["manifests"]]
    return [entry_key(doc["config"])] + [entry_key(layer) for layer in doc["layers"]]


def getfattr(path) -> dict[str, str]:
    out = subprocess.run(["getfattr", "-d", "-m", "-", "--absolute-names", str(path)],
                         capture_output=True, text=True, check=True).stdout
    attrs = {}
    for line in out.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            attrs[k] = v.strip('"')
    return attrs


def sha256sum(path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def assert_disjoint_ranges(hits, size: int) -> None:
    """The requests for one blob asked for every byte exactly once."""
    spans = []
    for h in hits:
        r = h.request_headers.get("range")
        if r is None:
            spans.append((0, size))
        else:
            a, b = r.split("=")[1].split("-")
            spans.append((int(a), int(b) + 1))
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == size, spans
    assert all(e1 == s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), spans


def wait_for(predicate, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def manifest_gets(proxy) -> list[str]:
    return [h.path.rsplit("/", 1)[1] for h in proxy.gets("/manifests/")]


def test_listing_is_the_graph_and_mount_costs_one_platform(proxy, images, mnt, cache_dir):
    idx = images.oci
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        # Only the index and the selected platform's manifest were GET; no blob at all.
        assert sorted(manifest_gets(proxy)) == sorted([idx.digest, images.amd.digest])
        assert proxy.gets("/blobs/") == []
        top = set(os.listdir(mnt))
        index_kids = children_keys(idx.index)
        expected = {"root", "rootfs", "oci-layout", "index.json", "blobs", ref_key(idx.index), *index_kids,
                    *children_keys(images.amd.manifest)}
        assert top == expected, "before looking inside the arm64 manifest, its children are unknown"
        assert os.readlink(m.path("root")) == ref_key(idx.index)
        # stat sizes equal descriptor sizes before any fetch
        for blob in [images.amd.config, *images.amd.layers]:
            assert os.stat(m.path(ref_key(blob), "blob")).st_size == blob.size
        assert proxy.gets("/blobs/") == []
        # child symlinks in order, for every directory, once the graph is walked
        assert os.listdir(m.path(ref_key(idx.index))) == ["blob", *index_kids]
        for image in (images.amd, images.arm):
            d = m.path(ref_key(image.manifest))
            kids = children_keys(image.manifest)
            assert os.listdir(d) == ["blob", *kids, "rootfs"]
            for k in kids:
                assert os.readlink(d / k) == f"../{k}"
                assert (d / k / "blob").exists()
        # the walk found the arm64 children: now every descriptor is listed, each once (the shared
        # layer too); the artifact's empty config is reachable only by the registry, not the graph
        listed = [n for n in os.listdir(mnt) if "-sha256:" in n]
        assert len(listed) == len(set(listed))
        walked = {ref_key(idx.index)} | set(index_kids)
        for image in (images.amd, images.arm):
            walked |= set(children_keys(image.manifest))
        assert set(listed) == walked
        assert ref_key(images.shared) in listed


def test_all_platforms_fetches_every_manifest(proxy, images, mnt, cache_dir):
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, "--all-platforms"):
        assert sorted(manifest_gets(proxy)) == sorted([images.oci.digest, images.amd.digest, images.arm.digest])
        # the artifact is not a manifest we walk at mount; it is listed from the index
        assert f"unknown-{images.sbom.digest}" in os.listdir(mnt)


def test_every_blob_hashes_to_its_digest_and_blobs_dir_is_the_same_inode(proxy, images, mnt, cache_dir):
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, "--all-platforms") as m:
        names = [n for n in os.listdir(mnt) if "-sha256:" in n]
        assert len(names) >= 8
        for name in names:
            blob = m.path(name, "blob")
            digest = name.split("-", 1)[1]
            assert "sha256:" + sha256sum(blob) == digest, name
            same = m.path("blobs", "sha256", digest.split(":")[1])
            assert os.stat(same).st_ino == os.stat(blob).st_ino
            assert os.stat(blob).st_nlink >= 2
            assert getfattr(blob)["user.imagefs.fetched"] == str(os.stat(blob).st_size)
        # the cache holds exactly verified blobs
        for f in (cache_dir / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name


def test_gc_labels_in_xattrs_with_the_seed_numbering(proxy, images, mnt, cache_dir):
    idx, amd = images.oci, images.amd
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        root = getfattr(m.path("root/"))
        gc = {k: v for k, v in root.items() if "containerd.io" in k}
        doc = json.loads(idx.index.data)
        want = {f"user.containerd.io/gc.ref.content.{i}": e["digest"] for i, e in enumerate(doc["manifests"])}
        assert set(gc) == set(want) | {"user.containerd.io/gc.root"}
        assert all(gc[k] == v for k, v in want.items())
        assert root["user.containerd.io/gc.root"].endswith("Z")
        assert root["user.imagefs.mediatype"] == im.OCI_INDEX
        assert root["user.imagefs.digest"] == idx.digest and root["user.imagefs.size"] == str(idx.index.size)

        man = getfattr(m.path(ref_key(amd.manifest)))
        mdoc = json.loads(amd.manifest.data)
        want = [mdoc["config"]["digest"]] + [layer["digest"] for layer in mdoc["layers"]]
        got = {k: v for k, v in man.items() if "containerd.io" in k}
        assert got == {f"user.containerd.io/gc.ref.content.{i}": d for i, d in enumerate(want)}
        assert man["user.imagefs.platform"] == "linux/amd64"
        assert getfattr(m.path(ref_key(images.arm.manifest), "blob"))["user.imagefs.platform"] == "linux/arm64/v8"

        layer = getfattr(m.path(ref_key(images.shared), "blob"))
        assert not [k for k in layer if "containerd.io" in k]
        assert layer["user.imagefs.fetched"] == "0"
        # the same labels on the committed blobs in the cache
        on_disk = getfattr(cache_dir / "blobs" / "sha256" / amd.digest.split(":")[1])
        assert {k: v for k, v in on_disk.items() if "containerd.io" in k} == got
        assert "user.containerd.io/gc.root" in getfattr(cache_dir / "blobs" / "sha256" / idx.digest.split(":")[1])


def test_32_concurrent_cold_readers_fetch_the_layer_once(proxy, images, mnt, cache_dir):
    shared = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        blob = m.path(ref_key(shared), "blob")
        with ThreadPoolExecutor(32) as pool:
            sums = list(pool.map(lambda _: sha256sum(blob), range(32)))
        assert set(sums) == {shared.digest.split(":")[1]}
        assert proxy.bytes_sent(shared.digest) == shared.size
        assert_disjoint_ranges(proxy.gets(shared.digest), shared.size)


def test_layer_read_is_served_before_the_blob_completes(proxy, images, mnt, cache_dir):
    shared = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        with open(m.path(ref_key(shared), "blob"), "rb") as f:
            head = f.read(4096)
        assert head == shared.data[:4096]
        # answered from what arrived: a fraction of the blob was fetched, and nothing is committed
        assert 4096 <= proxy.bytes_sent(shared.digest) < shared.size // 2
        assert not (cache_dir / "blobs" / "sha256" / shared.digest.split(":")[1]).exists()
        fetched = int(getfattr(m.path(ref_key(shared), "blob"))["user.imagefs.fetched"])
        assert 4096 <= fetched < shared.size
        # reading on completes, verifies and commits it, fetching each byte once
        assert sha256sum(m.path(ref_key(shared), "blob")) == shared.digest.split(":")[1]
        assert proxy.bytes_sent(shared.digest) == shared.size
        # readers were served once the digest matched; the fsync and rename follow at once
        assert wait_for(lambda: (cache_dir / "blobs" / "sha256" / shared.digest.split(":")[1]).exists())


def test_second_mount_with_the_registry_stopped_serves_from_cache(registry, proxy, images, tmp_path, cache_dir):
    first, second = tmp_path / "m1", tmp_path / "m2"
    sums = {}
    with Mount(f"{proxy.host}/test/oci:v1", first, cache_dir, "--all-platforms") as m:
        for name in os.listdir(first):
            if "-sha256:" in name:
                sums[name] = sha256sum(m.path(name, "blob"))
    registry.stop()
    try:
        with Mount(f"{proxy.host}/test/oci:v1", second, cache_dir, "--all-platforms") as m:
            assert set(n for n in os.listdir(second) if "-sha256:" in n) == set(sums)
            for name, digest in sums.items():
                assert sha256sum(m.path(name, "blob")) == digest
            assert "using sha256:" in m.log_text(), "the log says the remembered resolution was used"
            assert m.stderr.startswith("imagefs: warning: registry") and "using sha256:" in m.stderr
        # by digest, no registry and no tag memory needed
        with Mount(f"{proxy.host}/test/oci@{images.oci.digest}", tmp_path / "m3", cache_dir) as m:
            assert os.readlink(m.path("root")) == ref_key(images.oci.index)
    finally:
        registry.start()


def test_corrupted_layer_gives_eio_is_never_committed_and_is_refetched(proxy, images, mnt, cache_dir):
    layer = images.amd.layers[-1]
    other = images.amd.layers[0]
    proxy.corrupt(layer.digest, offset=layer.size // 2)
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        path = m.path(ref_key(layer), "blob")
        done = subprocess.run(["cat", str(path)], capture_output=True)
        assert done.returncode != 0 and b"Input/output error" in done.stderr
        assert not (cache_dir / "blobs" / "sha256" / layer.digest.split(":")[1]).exists()
        assert list((cache_dir / "ingest").iterdir()) == []
        assert "content has digest" in m.log_text() and ref_key(layer) in m.log_text()
        # the mount keeps serving other files
        assert sha256sum(m.path(ref_key(other), "blob")) == other.digest.split(":")[1]
        # a later read fetches again, and this time the registry is honest
        before = proxy.bytes_sent(layer.digest)
        proxy.clear_faults()
        assert sha256sum(path) == layer.digest.split(":")[1]
        assert proxy.bytes_sent(layer.digest) == before + layer.size


def test_corrupted_manifest_or_config_is_never_served(proxy, images, mnt, cache_dir):
    arm, amd = images.arm, images.amd
    proxy.corrupt(arm.digest, offset=10)
    proxy.corrupt(amd.config.digest, offset=5)
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        for blob in (arm.manifest, amd.config):
            done = subprocess.run(["cat", str(m.path(ref_key(blob), "blob"))], capture_output=True)
            assert done.returncode != 0 and b"Input/output error" in done.stderr
            assert done.stdout == b"", "not a byte of an unverified manifest or config"
            assert not (cache_dir / "blobs" / "sha256" / blob.digest.split(":")[1]).exists()
        assert subprocess.run(["ls", str(m.path(ref_key(arm.manifest)))], capture_output=True).returncode != 0
        proxy.clear_faults()
        assert json.loads(m.path(ref_key(amd.config), "blob").read_bytes()) == json.loads(amd.config.data)


def test_docker_schema1_is_refused_naming_the_media_type(proxy, mnt, cache_dir):
    body = json.dumps({"schemaVersion": 1, "name": "test/old", "tag": "v1", "fsLayers": [], "signatures": []}).encode()
    proxy.respond(r"/v2/test/old/manifests/", 200, body,
                  {"Content-Type": im.DOCKER_SCHEMA1_SIGNED, "Docker-Content-Digest": im.digest_of(body)})
    done = imagefs("mount", f"{proxy.host}/test/old:v1", mnt, "--cache-dir", cache_dir)
    assert done.returncode == 1
    assert im.DOCKER_SCHEMA1_SIGNED in done.stderr and "not supported" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mnt)


def test_docker_media_types_and_skopeo_reads_the_mount_as_an_oci_layout(proxy, images, mnt, cache_dir):
    d = images.docker
    with Mount(f"{proxy.host}/test/docker:v1", mnt, cache_dir, *AMD64) as m:
        assert os.readlink(m.path("root")) == f"index-{d.digest}"
        names = os.listdir(mnt)
        assert f"manifest-{images.d_amd.digest}" in names and f"config-{images.d_amd.config.digest}" in names
        for layer in images.d_amd.layers:
            assert f"layer-{layer.digest}" in names
            assert getfattr(m.path(f"layer-{layer.digest}"))["user.imagefs.mediatype"] == im.DOCKER_LAYER_GZIP
        raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{mnt}"], capture_output=True, check=True).stdout
        assert raw == d.index.data
        done = subprocess.run(["skopeo", "inspect", f"oci:{mnt}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["Architecture"] == "amd64"
        tar = subprocess.run(["tar", "--force-local", "-tzf", str(m.path(f"layer-{images.d_amd.layers[0].digest}", "blob"))],
                             capture_output=True, text=True, check=True)
        assert "etc/os-release" in tar.stdout


def test_single_manifest_root_and_readonly(proxy, images, mnt, cache_dir):
    with Mount(f"{proxy.host}/test/single:v1", mnt, cache_dir) as m:
        assert os.readlink(m.path("root")) == ref_key(images.single.manifest)
        assert json.loads(m.path("index.json").read_text())["manifests"][0]["digest"] == images.single.digest
        with pytest.raises(OSError) as err:
            open(m.path("root", "blob"), "w")
        assert err.value.errno == 30  # EROFS
        with pytest.raises(OSError):
            (mnt / "new").write_text("x")
        assert oct(os.stat(m.path("root", "blob")).st_mode & 0o777) == "0o444"
        assert oct(os.stat(m.path("root")).st_mode & 0o777) == "0o555"


def test_cli_errors_are_one_line_and_exit_nonzero(proxy, registry, mnt, cache_dir, tmp_path):
    cases = [
        (("mount", f"{proxy.host}/test/nope:v1", mnt), "manifest unknown"),
        (("mount", "127.0.0.1:1/x/y:z", mnt), "cannot reach registry"),
        (("mount", f"{proxy.host}/test/oci:v1", tmp_path / "missing"), "does not exist"),
        (("mount", f"{proxy.host}/test/oci:v1", mnt, "--platform", "linux/s390x"), "it has: linux/amd64, linux/arm64/v8"),
        (("umount", mnt), "is not a mount point"),
        (("mount", "UPPER/case", mnt), "invalid reference"),
    ]
    for args, message in cases:
        done = imagefs(*args, "--cache-dir", cache_dir) if args[0] == "mount" else imagefs(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not os.path.ismount(mnt)
    assert imagefs("mount", "--platform", "nonsense", "x", mnt).returncode == 2


def test_foreground_mount_unmounts_cleanly_on_sigterm(proxy, images, mnt, cache_dir):
    import signal
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "imagefs", "mount", f"{proxy.host}/test/single:v1", str(mnt),
                             "-f", "--cache-dir", str(cache_dir)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.ismount(mnt)
        assert (mnt / "root" / "blob").read_bytes() == images.single.manifest.data
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)
        assert "SIGTERM: unmounting" in proc.stderr.read()
    finally:
        proc.kill()


def test_umount_of_a_busy_mount_says_how_and_lazy_detaches(proxy, images, mnt, cache_dir):
    with Mount(f"{proxy.host}/test/single:v1", mnt, cache_dir) as m:
        with open(m.path("root", "blob"), "rb"):
            done = imagefs("umount", mnt)
            assert done.returncode == 1 and "--lazy" in done.stderr
            assert os.path.ismount(mnt)
            assert imagefs("umount", "--lazy", mnt).returncode == 0
            assert not os.path.ismount(mnt)
