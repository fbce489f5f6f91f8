"""``imagefs copy`` (issue 10) end to end, through the real command line: the session registry (with
its counting, fault-injecting proxy) is the source; a second docker-registry with its own storage,
behind its own proxy, is the destination; a third, behind the token issuer, checks push auth.
What is written is checked with tools we did not write: skopeo (every digest) and umoci."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support import Proxy, Registry, free_port
from tests.support.cachefiles import flip_byte
from tests.support.tokenserver import Rule, TokenServer

IMAGEFS = [sys.executable, "-m", "imagefs"]
ACCEPT = ", ".join([im.OCI_INDEX, im.OCI_MANIFEST, im.DOCKER_MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json"])
ALICE_PW = "alice-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def dest(tmp_path_factory):
    with Registry(tmp_path_factory.mktemp("dest")) as reg:
        yield reg


@pytest.fixture(scope="module")
def dest_proxy_server(dest):
    with Proxy(dest.host) as p:
        yield p


@pytest.fixture
def dest_proxy(dest_proxy_server):
    dest_proxy_server.clear_faults()
    dest_proxy_server.reset()
    return dest_proxy_server


def copy(*args, cache_dir, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([*IMAGEFS, "copy", *map(str, args), "--cache-dir", str(cache_dir)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr
    return done


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("imagefs: ")
    return lines[0]


def manifest(host: str, repo: str, obj: str) -> httpx.Response:
    return httpx.get(f"http://{host}/v2/{repo}/manifests/{obj}", headers={"Accept": ACCEPT})


def has_blob(host: str, repo: str, digest: str) -> bool:
    return httpx.head(f"http://{host}/v2/{repo}/blobs/{digest}").status_code == 200


def uploads(p: Proxy) -> list:
    """Requests that send blob bytes or start an upload."""
    return [h for h in p.hits if "/blobs/uploads/" in h.path and h.method in ("POST", "PATCH", "PUT")]


# -- a whole index --------------------------------------------------------------------------------


def test_a_multi_platform_index_is_copied_byte_identical(proxy, images, dest, dest_proxy, cache_dir, tmp_path):
    done = ok(copy(f"{proxy.host}/test/oci:v1", f"{dest_proxy.host}/copy/oci:v1", cache_dir=cache_dir))
    assert done.stdout.splitlines()[-1] == images.oci.digest, "the digest written is printed last"
    assert manifest(dest.host, "copy/oci", "v1").content == images.oci.index.data
    for child in (images.amd, images.arm):
        assert manifest(dest.host, "copy/oci", child.digest).content == child.manifest.data
        for blob in (child.config, *child.layers):
            assert has_blob(dest.host, "copy/oci", blob.digest)
    assert manifest(dest.host, "copy/oci", images.sbom.digest).content == images.sbom.data
    # the tag went up last, after every manifest it needs
    puts = [h.path for h in dest_proxy.hits if h.method == "PUT" and "/manifests/" in h.path]
    assert puts[-1].endswith("/manifests/v1")
    # what streamed is in the cache now, verified
    blobs = cache_dir / "blobs" / "sha256"
    assert (blobs / images.shared.digest[7:]).read_bytes() == images.shared.data
    skopeo = subprocess.run(["skopeo", "copy", "--all", "--src-tls-verify=false",
                             f"docker://{dest.host}/copy/oci:v1", f"oci:{tmp_path / 'sk'}:v1"],
                            capture_output=True, text=True, timeout=120)
    assert skopeo.returncode == 0, skopeo.stderr

    dest_proxy.reset()
    again = ok(copy(f"{proxy.host}/test/oci:v1", f"{dest_proxy.host}/copy/oci:v1", cache_dir=tmp_path / "fresh"))
    assert "uploaded 0 (0 B)" in again.stdout
    assert uploads(dest_proxy) == [], "a second copy uploads nothing"
    assert [h.path for h in dest_proxy.hits if h.method == "PUT"] == [puts[-1]], "only the tag is written again"


def test_platform_copies_one_manifest_and_dest_names_it(proxy, images, dest, dest_proxy, cache_dir):
    done = ok(copy(f"{proxy.host}/test/oci:v1", f"{dest_proxy.host}/copy/amd:v1", "--platform", "linux/amd64",
                   cache_dir=cache_dir))
    assert done.stdout.splitlines()[-1] == images.amd.digest
    assert manifest(dest.host, "copy/amd", "v1").content == images.amd.manifest.data
    assert manifest(dest.host, "copy/amd", images.arm.digest).status_code == 404


def test_within_one_registry_blobs_are_mounted_not_sent(images, dest, dest_proxy, proxy, cache_dir, tmp_path):
    ok(copy(f"{proxy.host}/test/docker:v1", f"{dest.host}/mount/src:v1", cache_dir=tmp_path / "c1"))
    dest_proxy.reset()
    done = ok(copy(f"{dest_proxy.host}/mount/src:v1", f"{dest_proxy.host}/mount/dst:v1", cache_dir=cache_dir))
    assert "mounted" in done.stdout
    mounts = [h for h in dest_proxy.hits if h.method == "POST" and "mount=" in h.path]
    assert mounts and all(h.status == 201 for h in mounts)
    assert not [h for h in dest_proxy.hits if h.method in ("PATCH", "PUT") and "/blobs/uploads/" in h.path]
    for layer in images.d_amd.layers:
        assert dest_proxy.bytes_sent(layer.digest) == 0, "the layer's bytes never travelled"
        assert has_blob(dest.host, "mount/dst", layer.digest)
    assert manifest(dest.host, "mount/dst", "v1").content == images.docker.index.data


# -- sources --------------------------------------------------------------------------------------


def test_from_the_cache_with_the_source_registry_stopped(tmp_path, dest, dest_proxy, cache_dir):
    img = im.index([im.image([im.random_layer(2 << 20, seed=91)], platform={"os": "linux", "architecture": "amd64"}),
                    im.image([im.random_layer(1 << 20, seed=92)], platform={"os": "linux", "architecture": "arm64"})])
    with Registry(tmp_path / "src") as src:
        push(src.host, "own/app", img, "v1")
        subprocess.run([*IMAGEFS, "pull", f"{src.host}/own/app:v1", "--all-platforms", "--cache-dir", str(cache_dir)],
                       check=True, capture_output=True)
        src.stop()
        by_tag = ok(copy(f"{src.host}/own/app:v1", f"{dest_proxy.host}/cached/app:v1", cache_dir=cache_dir))
        assert "read 0 B from the source" in by_tag.stdout
        by_digest = ok(copy(f"{src.host}/own/app@{img.digest}", f"{dest_proxy.host}/cached/bydigest:v1",
                            cache_dir=cache_dir))
        assert by_digest.stdout.splitlines()[-1] == img.digest
    assert manifest(dest.host, "cached/app", "v1").content == img.index.data
    for child in img.children:
        assert manifest(dest.host, "cached/bydigest", child.digest).content == child.manifest.data
        for blob in (child.config, *child.layers):
            assert has_blob(dest.host, "cached/bydigest", blob.digest)


def copy_with_one_cut(dest_proxy: Proxy, *args, cache_dir) -> subprocess.CompletedProcess:
    """Run a copy whose PATCHes each wait a little at the proxy; once one chunk has landed, the next
    is refused by a 502 (once)."""
    dest_proxy.delay(r"/blobs/uploads/", 0.2, method="PATCH")
    cut: list = []

    def cut_after_first_chunk() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not cut:
            if any(h.method == "PATCH" and h.status == 202 for h in dest_proxy.hits):
                cut.append(dest_proxy.respond(r"/blobs/uploads/", 502, b"cut", method="PATCH", times=1))
            time.sleep(0.005)

    watcher = threading.Thread(target=cut_after_first_chunk, daemon=True)
    watcher.start()
    done = ok(copy(*args, cache_dir=cache_dir))
    watcher.join()
    assert cut and cut[0].applied == 1, "the upload was cut once"
    return done


def landed(dest_proxy: Proxy) -> int:
    """Blob bytes the destination registry took (refused requests not counted)."""
    return sum(int(h.request_headers.get("content-length") or 0) for h in dest_proxy.hits
               if h.method in ("PATCH", "PUT") and "/blobs/uploads/" in h.path and h.fault is None)


def test_a_cut_upload_resumes_and_ends_with_the_right_digest(registry, proxy, dest, dest_proxy, cache_dir):
    """The copy carries on from the offset the registry reports: no byte reaches it twice."""
    big = im.random_layer(40 << 20, seed=57, compression="none")
    img = im.image([big])
    push(registry.host, "test/big", img, "v1")
    done = copy_with_one_cut(dest_proxy, f"{proxy.host}/test/big:v1", f"{dest_proxy.host}/resumed/big:v1",
                             cache_dir=cache_dir)
    assert done.stdout.splitlines()[-1] == img.digest
    got = httpx.get(f"http://{dest.host}/v2/resumed/big/blobs/{big.digest}")
    assert hashlib.sha256(got.content).hexdigest() == big.digest[7:]
    assert landed(dest_proxy) - big.size in (0, img.config.size), "resumed where it stopped, not from the start"


def pushed_and_pulled(registry, proxy, repo: str, img, cache_dir) -> None:
    """``img`` pushed as ``repo:v1`` and pulled into the cache: a copy then reads its blobs from there."""
    push(registry.host, repo, img, "v1")
    subprocess.run([*IMAGEFS, "pull", f"{proxy.host}/{repo}:v1", "--cache-dir", str(cache_dir)], check=True,
                   capture_output=True)


def test_from_the_cache_a_cut_sendfile_upload_resumes(registry, proxy, dest, dest_proxy, cache_dir):
    """A committed blob goes by ``sendfile`` on the socket route; cut, it resumes at the registry's offset."""
    big = im.random_layer(40 << 20, seed=58, compression="none")
    img = im.image([big])
    pushed_and_pulled(registry, proxy, "test/cachedbig", img, cache_dir)
    done = copy_with_one_cut(dest_proxy, f"{proxy.host}/test/cachedbig:v1", f"{dest_proxy.host}/resumed/cachedbig:v1",
                             cache_dir=cache_dir)
    assert "read 0 B from the source" in done.stdout
    got = httpx.get(f"http://{dest.host}/v2/resumed/cachedbig/blobs/{big.digest}")
    assert hashlib.sha256(got.content).hexdigest() == big.digest[7:]
    assert landed(dest_proxy) - big.size in (0, img.config.size), "resumed where it stopped, not from the start"
    patches = [h for h in dest_proxy.hits if h.method == "PATCH" and h.fault is None]
    assert all(h.request_headers.get("connection", "").lower() == "close" for h in patches), "on the socket route"


def test_a_cache_file_corrupted_on_disk_is_never_uploaded_under_its_digest(registry, proxy, dest, dest_proxy, cache_dir):
    layer = im.random_layer(3 << 20, seed=59, compression="none")
    img = im.image([layer])
    pushed_and_pulled(registry, proxy, "test/rotten", img, cache_dir)
    path = cache_dir / "blobs" / "sha256" / layer.digest[7:]
    flip_byte(path, layer.size // 2)
    line = one_error_line(copy(f"{proxy.host}/test/rotten:v1", f"{dest_proxy.host}/rotten/app:v1", cache_dir=cache_dir))
    assert layer.digest in line and "digest" in line
    assert manifest(dest.host, "rotten/app", "v1").status_code == 404, "no tag on a partial image"
    assert not has_blob(dest.host, "rotten/app", layer.digest)
    assert not any(h.method == "PUT" and layer.digest[7:] in h.path for h in dest_proxy.hits), "never PUT under its digest"


def test_a_corrupt_source_blob_fails_and_leaves_no_tag(proxy, images, dest, dest_proxy, cache_dir):
    layer = images.shared
    proxy.corrupt(layer.digest, offset=len(layer.data) // 2)
    line = one_error_line(copy(f"{proxy.host}/test/oci:v1", f"{dest_proxy.host}/corrupt/oci:v1", cache_dir=cache_dir))
    assert layer.digest in line and "digest" in line
    assert manifest(dest.host, "corrupt/oci", "v1").status_code == 404, "no tag on a partial image"
    assert not has_blob(dest.host, "corrupt/oci", layer.digest)
    assert not (cache_dir / "blobs" / "sha256" / layer.digest[7:]).exists(), "nothing wrong in the cache"
    proxy.clear_faults()
    dest_proxy.reset()
    ok(copy(f"{proxy.host}/test/oci:v1", f"{dest_proxy.host}/corrupt/oci:v1", cache_dir=cache_dir))
    assert manifest(dest.host, "corrupt/oci", "v1").content == images.oci.index.data
    sent = {h.path.rsplit("/", 1)[-1] for h in dest_proxy.hits if h.method == "HEAD" and "/blobs/" in h.path}
    assert layer.digest in sent


def test_a_blob_another_process_is_writing_streams_uncached_and_is_still_verified(proxy, images, dest, dest_proxy,
                                                                                    cache_dir):
    """When another process holds the cache's writer for a blob (a mount fetching it), the copy
    streams it from SRC without caching it: hashed on the way all the same, so a corrupt source
    still fails without a tag, and a clean one is copied while the cache stays untouched."""
    from imagefs.content import filelock

    layer = images.shared
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.try_lock(cache_dir, f"layer-{layer.digest}")
    assert lock is not None
    try:
        proxy.corrupt(layer.digest, offset=len(layer.data) // 2)
        line = one_error_line(copy(f"{proxy.host}/test/oci:v1", f"{dest_proxy.host}/held/oci:v1", cache_dir=cache_dir))
        assert layer.digest in line and "source sent" in line
        assert manifest(dest.host, "held/oci", "v1").status_code == 404, "no tag on a partial image"
        assert not has_blob(dest.host, "held/oci", layer.digest)
        proxy.clear_faults()
        ok(copy(f"{proxy.host}/test/oci:v1", f"{dest_proxy.host}/held/oci:v1", cache_dir=cache_dir))
        assert manifest(dest.host, "held/oci", "v1").content == images.oci.index.data
        assert has_blob(dest.host, "held/oci", layer.digest)
        assert not (cache_dir / "blobs" / "sha256" / layer.digest[7:]).exists(), "the held blob was not cached"
    finally:
        lock.close()


# -- auth -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_dest(tmp_path_factory):
    rules = [Rule(None, "*", frozenset({"pull"})), Rule("alice", "*", frozenset({"pull", "push"}))]
    with TokenServer(tmp_path_factory.mktemp("tokens"), users={"alice": ALICE_PW}, rules=rules) as issuer, \
            Registry(tmp_path_factory.mktemp("token-dest"), extra_config=issuer.registry_config()) as reg:
        yield reg


def test_token_auth_anonymous_is_refused_and_config_json_credentials_push(proxy, images, token_dest, cache_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    env["HOME"] = str(home)
    target = f"{token_dest.host}/pushed/app:v1"
    line = one_error_line(copy(f"{proxy.host}/test/single:v1", target, cache_dir=cache_dir, env=env))
    assert f"access denied to {token_dest.host}/pushed/app (anonymous)" in line and "push" in line
    (home / ".docker").mkdir()
    auth = base64.b64encode(f"alice:{ALICE_PW}".encode()).decode()
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {token_dest.host: {"auth": auth}}}))
    done = ok(copy(f"{proxy.host}/test/single:v1", target, cache_dir=cache_dir, env=env))
    assert done.stdout.splitlines()[-1] == images.single.digest
    assert ALICE_PW not in done.stdout + done.stderr


# -- oci: layouts ---------------------------------------------------------------------------------


def test_an_oci_layout_is_read_by_skopeo_and_umoci(proxy, images, cache_dir, tmp_path):
    layout = tmp_path / "layout"
    done = ok(copy(f"{proxy.host}/test/oci:v1", f"oci:{layout}:amd", "--platform", "linux/amd64", cache_dir=cache_dir))
    assert done.stdout.splitlines()[-1] == images.amd.digest
    inspect = subprocess.run(["skopeo", "inspect", f"oci:{layout}:amd"], capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Digest"] == images.amd.digest
    unpack = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:amd", str(tmp_path / "bundle")],
                            capture_output=True, text=True, timeout=60)
    assert unpack.returncode == 0, unpack.stderr
    assert (tmp_path / "bundle" / "rootfs" / "etc" / "arch").read_bytes() == b"amd64\n"
    assert (tmp_path / "bundle" / "rootfs" / "opt" / "shared.bin").stat().st_size > 0

    # the whole index beside it, under a second tag; blobs already there are skipped
    again = ok(copy(f"{proxy.host}/test/oci:v1", f"oci:{layout}:all", cache_dir=cache_dir))
    assert "skipped 4" in again.stdout  # the amd64 config and layers
    index = json.loads((layout / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert names == {"amd": images.amd.digest, "all": images.oci.digest}
    for path in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    assert (layout / "blobs" / "sha256" / images.oci.digest[7:]).read_bytes() == images.oci.index.data
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{layout}:all"], capture_output=True, timeout=60)
    assert raw.stdout == images.oci.index.data


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_for_oci_is_one_line_and_nothing_half_written(proxy, images, cache_dir, small_disk):
    layout = small_disk / "layout"
    line = one_error_line(copy(f"{proxy.host}/test/oci:v1", f"oci:{layout}:v1", cache_dir=cache_dir))
    assert "no space left" in line
    assert not (layout / "index.json").exists(), "no tag"
    for path in layout.rglob("*"):
        assert not path.name.endswith(".tmp"), path
        if path.parent.name == "sha256":
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_exit_1(proxy, cache_dir, dest_proxy, tmp_path):
    line = one_error_line(copy(f"{proxy.host}/test/nothing:v1", f"oci:{tmp_path / 'x'}", cache_dir=cache_dir))
    assert "manifest unknown" in line
    nowhere = f"127.0.0.1:{free_port()}/x/y:v1"
    line = one_error_line(copy(f"{proxy.host}/test/single:v1", nowhere, cache_dir=cache_dir, timeout=240))
    assert "127.0.0.1" in line
    line = one_error_line(copy(f"{proxy.host}/test/single:v1", "oci:", cache_dir=cache_dir))
    assert "oci:" in line


def test_a_dest_that_keeps_answering_5xx_is_retried_then_one_line_and_a_rerun_finishes(proxy, images, dest, dest_proxy,
                                                                                      cache_dir):
    refusing = dest_proxy.respond(r"/blobs/uploads/", 503, b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}',
                                  {"Content-Type": "application/json"}, method="POST")
    line = one_error_line(copy(f"{proxy.host}/test/single:v1", f"{dest_proxy.host}/flaky/single:v1", cache_dir=cache_dir,
                               timeout=240))
    assert "503" in line
    assert refusing.applied > 1, "retried before giving up"
    assert manifest(dest.host, "flaky/single", "v1").status_code == 404
    refusing.clear()
    ok(copy(f"{proxy.host}/test/single:v1", f"{dest_proxy.host}/flaky/single:v1", cache_dir=cache_dir))
    assert manifest(dest.host, "flaky/single", "v1").content == images.single.manifest.data
