"""The image builder (imagefs.testing) against a real registry, skopeo and umoci.

Everything else in the test suite trusts these images to be exactly what they
claim, so this file checks them with tools that share no code with the builder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from imagefs.testing import demo
from imagefs.testing.images import (
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, EPOCH, OCI_INDEX,
    OCI_LAYER_GZIP, OCI_MANIFEST, Blob, FileEntry, artifact, digest_of, image, index, random_bytes,
    random_layer, tar_layer,
)
from imagefs.testing.push import PushError, push

ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def _registry(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway docker-registry (distribution 2.8) on a free loopback port."""
    root = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"registry exited: {(root / 'registry.log').read_text()}")
            try:
                if httpx.get(f"http://{address}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("registry did not answer GET /v2/ within 15 s")
            time.sleep(0.05)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _skopeo(*args: str) -> str:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _raw(address: str, ref: str) -> bytes:
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{address}/{ref}"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _two_platforms():
    shared = tar_layer({"etc/os-release": b'NAME="shared"\n', "bin/sh": FileEntry.symlink("busybox")})
    amd = image([shared, tar_layer({"etc/arch": b"amd64\n"})])
    arm = image([shared, tar_layer({"etc/arch": b"arm64\n"})], platform=ARM64)
    return shared, amd, arm


# ------------------------------------------------------------- offline checks


def test_building_twice_gives_the_same_digests():
    first, second = demo.build_demo(), demo.build_demo()
    assert first.digest == second.digest
    assert list(first.blobs) == list(second.blobs)
    # insertion order of the files dict must not matter, the seed must
    files = {"b": b"2", "a/x": b"1", "c": FileEntry.dir()}
    assert tar_layer(files).digest == tar_layer(dict(reversed(files.items()))).digest
    assert random_layer(4096, 1).digest == random_layer(4096, 1).digest
    assert random_layer(4096, 1).digest != random_layer(4096, 2).digest


def test_layer_tar_is_normalised():
    layer = tar_layer({
        "/usr/share/doc/x": b"doc",
        "./etc/passwd": FileEntry.file(b"root\n", 0o600),
        "tmp": FileEntry.dir(0o1777),
        "link": FileEntry.symlink("usr/share/doc/x"),
        "hard": FileEntry.hardlink("etc/passwd"),
    })
    assert layer.media_type == OCI_LAYER_GZIP
    assert layer.data[:2] == b"\x1f\x8b" and layer.data[4:8] == b"\0\0\0\0"  # gzip mtime 0
    raw = gzip.decompress(layer.data)
    assert raw[257:265] == b"ustar\x0000"  # POSIX (PAX) header, not GNU
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names == ["etc", "etc/passwd", "hard", "link", "tmp", "usr", "usr/share", "usr/share/doc",
                     "usr/share/doc/x"]
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == EPOCH for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["usr/share"].isdir() and by_name["usr/share"].mode == 0o755
    assert by_name["tmp"].mode == 0o1777 and by_name["etc/passwd"].mode == 0o600
    assert by_name["link"].issym() and by_name["link"].linkname == "usr/share/doc/x"
    assert by_name["hard"].islnk() and by_name["hard"].linkname == "etc/passwd"
    assert tar_layer({"a": b"x"}, compression="none").data[257:265] == b"ustar\x0000"


def test_config_diff_ids_are_digests_of_the_uncompressed_layers():
    for img in demo.build_demo().children:
        config, manifest = json.loads(img.config.data), json.loads(img.manifest.data)
        assert config["rootfs"]["diff_ids"] == [
            "sha256:" + hashlib.sha256(gzip.decompress(layer.data)).hexdigest() for layer in img.layers
        ]
        assert len(config["history"]) == len(img.layers) >= 3
        assert (config["os"], config["architecture"]) == (img.platform["os"], img.platform["architecture"])
        assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == OCI_MANIFEST
        assert manifest["config"]["digest"] == digest_of(img.config.data)
        assert [(d["digest"], d["size"]) for d in manifest["layers"]] == [
            ("sha256:" + hashlib.sha256(layer.data).hexdigest(), len(layer.data)) for layer in img.layers
        ]


def test_index_lists_platforms_and_artifacts():
    shared, amd, arm = _two_platforms()
    sbom = artifact()
    idx = index([amd, arm, sbom])
    doc = json.loads(idx.index.data)
    assert doc["mediaType"] == OCI_INDEX
    assert [m.get("platform") for m in doc["manifests"]] == [amd.platform, ARM64, None]
    assert doc["manifests"][2]["mediaType"] == "application/vnd.example.sbom.v1+json"
    # index + amd64 (manifest, config, 2 layers) + arm64 (manifest, config, own layer)
    # + artifact and its empty config: the shared layer counts once
    assert shared.digest in idx.blobs and len(idx.blobs) == 1 + 4 + 3 + 2
    docker = index([image([tar_layer({"a": b"b"}, media="docker")], media="docker")], media="docker")
    assert json.loads(docker.index.data)["mediaType"] == DOCKER_MANIFEST_LIST


# --------------------------------------------------------- against a registry


def test_pushed_index_is_served_byte_exact_and_copies(_registry: str, tmp_path: Path):
    shared, amd, arm = _two_platforms()
    idx = index([amd, arm])
    assert push(_registry, "test/multi", idx, "v1") == idx.digest

    assert _raw(_registry, "test/multi:v1") == idx.index.data
    for child in (amd, arm):
        assert _raw(_registry, f"test/multi@{child.digest}") == child.manifest.data

    layout = tmp_path / "layout"
    _skopeo("copy", "--src-tls-verify=false", "--all",
            f"docker://{_registry}/test/multi:v1", f"oci:{layout}:v1")
    top = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in top["manifests"]] == [idx.digest]
    stored = {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}
    assert all(digest_of(data) == digest for digest, data in stored.items())
    assert {d: b.data for d, b in idx.blobs.items()} == stored  # every byte, nothing more
    assert stored[shared.digest] == shared.data and len(stored) == 1 + 4 + 3


def test_index_with_an_artifact_is_served_byte_exact(_registry: str):
    # Note: `skopeo copy` of this index rewrites it (it replaces the artifact
    # entry's mediaType with that of the manifest it fetched), so only the
    # registry's own bytes are checked here.
    _, amd, _ = _two_platforms()
    sbom = artifact()
    idx = index([amd, sbom])
    push(_registry, "test/artifact", idx, "v1")
    assert _raw(_registry, "test/artifact:v1") == idx.index.data
    assert _raw(_registry, f"test/artifact@{sbom.digest}") == sbom.data
    assert json.loads(_raw(_registry, "test/artifact:v1"))["manifests"][1]["mediaType"] == sbom.media_type
    alone = artifact("application/vnd.example.other+json")
    assert push(_registry, "test/artifact", alone, "alone") == alone.digest
    assert _raw(_registry, "test/artifact:alone") == alone.data


def test_umoci_unpacks_the_demo(_registry: str, tmp_path: Path):
    root = demo.push_demo(_registry, "test/demo-umoci", "x")
    amd = demo.build_demo().children[0]
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    _skopeo("copy", "--src-tls-verify=false", f"docker://{_registry}/test/demo-umoci@{amd.digest}",
            f"oci:{layout}:amd64")
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:amd64", str(bundle)],
                   check=True, capture_output=True, timeout=120)
    rootfs = bundle / "rootfs"
    assert 'NAME="imagefs demo"' in (rootfs / "etc/os-release").read_text()
    assert (rootfs / "etc/arch").read_text() == "amd64\n"
    assert (rootfs / "usr/lib/amd64/hello.txt").is_file()
    assert os.readlink(rootfs / "README") == "usr/share/doc/imagefs/README"
    assert (rootfs / "opt/data/blob.bin").read_bytes() == random_bytes(demo.DATA_SIZE, demo.DATA_SEED)
    assert root == demo.build_demo().digest


def test_docker_media_image_pushes_and_inspects(_registry: str):
    layer = tar_layer({"hello": b"world\n"}, media="docker")
    img = image([layer], media="docker")
    assert layer.media_type == DOCKER_LAYER_GZIP and img.config.media_type == DOCKER_CONFIG
    assert img.manifest.media_type == DOCKER_MANIFEST
    push(_registry, "test/docker", img, "v2")
    info = json.loads(_skopeo("inspect", "--tls-verify=false", f"docker://{_registry}/test/docker:v2"))
    assert info["Digest"] == img.digest
    assert info["Layers"] == [layer.digest]
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    assert _raw(_registry, "test/docker:v2") == img.manifest.data


def test_demo_cli_pushes_two_platforms(_registry: str):
    out = subprocess.run([sys.executable, "-m", "imagefs.testing.demo", "--registry", _registry,
                          "--repo", "test/demo"], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    ref, digest = out.stdout.split()
    assert ref == f"{_registry}/test/demo:latest"
    assert digest == demo.build_demo().digest  # same digests as an in-process build
    doc = json.loads(_raw(_registry, "test/demo:latest"))
    assert [(m["platform"]["os"], m["platform"]["architecture"]) for m in doc["manifests"]] == [
        ("linux", "amd64"), ("linux", "arm64")]
    arm = json.loads(_skopeo("inspect", "--tls-verify=false", "--override-arch", "arm64",
                             f"docker://{_registry}/test/demo:latest"))
    assert arm["Architecture"] == "arm64" and len(arm["Layers"]) == 3


def test_second_push_uploads_nothing(_registry: str):
    img = image([random_layer(64 << 10, 7)])
    push(_registry, "test/again", img)
    seen: list[str] = []
    with httpx.Client(event_hooks={"request": [lambda r: seen.append(r.method)]}) as client:
        push(_registry, "test/again", img, client=client)
    assert "POST" not in seen and seen.count("PUT") == 1  # only the tag


def test_push_errors_carry_the_registry_message(_registry: str):
    img = image([tar_layer({"a": b"b"})])
    with pytest.raises(PushError, match="MANIFEST_BLOB_UNKNOWN"):
        push(_registry, "test/broken", img.manifest)  # manifest without its blobs
    with pytest.raises(PushError, match="MANIFEST_INVALID"):
        push(_registry, "test/broken", index([artifact(data=b'{"not": "a manifest"}')]))


def test_push_handles_relative_location_with_query():
    blob = Blob("application/octet-stream", b"payload")
    puts: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/r/blobs/uploads/u1?_state=abc"})
        puts.append(request.url)
        assert request.content == b"payload"
        return httpx.Response(201)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert push("reg.test:5000", "r", blob, client=client) == blob.digest
    assert len(puts) == 1
    assert puts[0].path == "/v2/r/blobs/uploads/u1" and puts[0].host == "reg.test"
    assert dict(puts[0].params) == {"_state": "abc", "digest": blob.digest}
