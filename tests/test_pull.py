"""``imagefs pull`` (plain lines off a terminal, bars on one) and ``imagefs inspect``."""

import hashlib
import json
import os
import re
import subprocess

from imagefs.descriptors import ref_key as _ref_key
from imagefs.testing import images as im
from imagefs.units import human
from tests.support.mounting import IMAGEFS, Mount, imagefs

ANSI = re.compile(r"\x1b\[")


def ref_key(blob: im.Blob) -> str:
    from imagefs.descriptors import Descriptor

    return _ref_key(Descriptor(blob.media_type, blob.digest, blob.size))


def test_pull_prints_plain_lines_and_a_total_then_a_mount_needs_no_registry(registry, proxy, images, cache_dir, tmp_path):
    idx = images.oci
    graph = [idx.index, images.amd.manifest, images.arm.manifest, images.sbom,
             images.amd.config, images.arm.config, *images.amd.layers, *images.arm.layers]
    graph = list({b.digest: b for b in graph}.values())
    done = imagefs("pull", f"{proxy.host}/test/oci:v1", "--all-platforms", "--cache-dir", cache_dir, check=True)
    assert not ANSI.search(done.stdout), "no terminal, no escape codes"
    lines = done.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(f"fetched {ref_key(b)} {human(b.size)}" for b in graph)
    total = sum(b.size for b in graph)
    assert lines[-1].startswith(f"pulled {proxy.host}/test/oci:v1 ({idx.digest}): {len(graph)} blobs, {human(total)}; "
                                f"fetched {len(graph)} ({human(total)}), 0 already cached; ")
    assert done.stderr == ""
    assert len(proxy.gets(images.shared.digest)) == 1, "a layer shared by two platforms is fetched once"

    again = imagefs("pull", f"{proxy.host}/test/oci:v1", "--all-platforms", "--cache-dir", cache_dir, check=True)
    assert sorted(again.stdout.splitlines()[:-1]) == sorted(f"exists  {ref_key(b)} {human(b.size)}" for b in graph)
    assert "fetched 0 (0 B), 10 already cached" in again.stdout

    registry.stop()
    try:
        with Mount(f"{proxy.host}/test/oci:v1", tmp_path / "m", cache_dir, "--all-platforms") as m:
            names = [n for n in os.listdir(m.mountpoint) if "-sha256:" in n]
            assert sorted(names) == sorted(ref_key(b) for b in graph)
            for name in names:
                data = m.path(name, "blob").read_bytes()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == name.split("-", 1)[1]
    finally:
        registry.start()


def test_pull_reports_a_failed_blob_and_exits_1(proxy, images, cache_dir):
    layer = images.d_amd.layers[-1]
    proxy.corrupt(layer.digest, offset=100)
    done = imagefs("pull", f"{proxy.host}/test/docker:v1", "--platform", "linux/amd64", "--cache-dir", cache_dir)
    assert done.returncode == 1
    assert f"failed  layer-{layer.digest} {human(layer.size)}" in done.stdout
    assert done.stdout.splitlines()[-1].endswith("; 1 FAILED")
    assert done.stderr == f"imagefs: layer-{layer.digest}: layer-{layer.digest}: content has digest " \
                          f"{done.stderr.split('content has digest ')[1]}"
    assert len(done.stderr.splitlines()) == 1
    assert not (cache_dir / "blobs" / "sha256" / layer.digest[7:]).exists()
    assert (cache_dir / "blobs" / "sha256" / images.d_amd.config.digest[7:]).exists(), "the rest was fetched"
    bad = imagefs("pull", f"{proxy.host}/test/nothing:v1", "--cache-dir", cache_dir)
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1 and "manifest unknown" in bad.stderr
    # two manifests failing at once (a concurrent walk) still make one line
    proxy.corrupt(images.amd.digest, offset=10)
    proxy.corrupt(images.arm.digest, offset=10)
    both = imagefs("pull", f"{proxy.host}/test/oci:v1", "--all-platforms", "--cache-dir", cache_dir)
    assert both.returncode == 1 and len(both.stderr.splitlines()) == 1, both.stderr
    assert "content has digest" in both.stderr


def test_pull_on_a_terminal_draws_progress_bars(proxy, images, cache_dir):
    controller, terminal = os.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen([*IMAGEFS, "pull", f"{proxy.host}/test/single:v1", "--cache-dir", str(cache_dir)],
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE, env=env)
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    text = out.decode(errors="replace")
    assert ANSI.search(text), "a terminal gets rich output"
    assert f"layer-{images.single.layers[0].digest}" in text and "pulled " in text


def test_inspect_json_fetches_manifests_only(proxy, images, cache_dir):
    idx, amd, arm = images.oci, images.amd, images.arm
    done = imagefs("inspect", f"{proxy.host}/test/oci:v1", "--platform", "linux/amd64", "--json",
                   "--cache-dir", cache_dir, check=True)
    doc = json.loads(done.stdout)
    assert proxy.gets("/blobs/") == [], "no config, no layer"
    assert sorted(h.path.rsplit("/", 1)[1] for h in proxy.gets("/manifests/")) == sorted([idx.digest, amd.digest])
    root = doc["root"]
    assert doc["reference"] == f"{proxy.host}/test/oci:v1"
    assert (root["refKey"], root["mediaType"], root["size"]) == (ref_key(idx.index), im.OCI_INDEX, idx.index.size)
    kids = root["children"]
    assert [k["digest"] for k in kids] == [amd.digest, arm.digest, images.sbom.digest]
    assert kids[0]["platform"] == {"os": "linux", "architecture": "amd64"}
    assert kids[1]["platform"] == {"os": "linux", "architecture": "arm64", "variant": "v8"}
    assert kids[1]["children"] is None, "another platform's manifest is not fetched"
    assert [k["refKey"] for k in kids[0]["children"]] == [ref_key(amd.config), *map(ref_key, amd.layers)]
    assert [k["size"] for k in kids[0]["children"]] == [amd.config.size, *(x.size for x in amd.layers)]
    assert "children" not in kids[2]
    assert not (cache_dir / "blobs" / "sha256").exists() or not any((cache_dir / "blobs" / "sha256").iterdir()), \
        "inspect leaves no blob in the cache"

    proxy.reset()
    text = imagefs("inspect", f"{proxy.host}/test/oci:v1", "--all-platforms", "--cache-dir", cache_dir, check=True).stdout
    assert proxy.gets("/blobs/") == []
    assert "linux/arm64/v8" in text and f"└── {ref_key(images.sbom)}" in text
    assert text.count(ref_key(images.shared)) == 2, "the shared layer appears under both platforms"
    assert imagefs("inspect", "--bogus", "x").returncode == 2


def test_a_reader_that_stops_early_ends_inspect_quietly(proxy, images, cache_dir):
    """`imagefs inspect … | head`: once the pipe's reader is gone, exit 141 (SIGPIPE's status, as
    coreutils give) with nothing on stderr — no traceback."""
    r, w = os.pipe()
    os.close(r)  # a reader that has already had enough
    try:
        done = subprocess.run([*IMAGEFS, "inspect", f"{proxy.host}/test/oci:v1", "--all-platforms", "--cache-dir", str(cache_dir)],
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert (done.returncode, done.stderr) == (141, "")
