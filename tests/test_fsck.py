"""``imagefs fsck``: re-hashes blobs, checks labels, ingests and records; ``--repair`` fixes them.

The corrupted-blob case runs end to end (mount, corrupt on disk, fsck, repair, mount again);
label and bookkeeping cases build the broken state directly in a store, in-process.
"""

import hashlib
import io
import json
import os

from imagefs import descriptors as d
from imagefs.content import maintenance
from imagefs.content.local import LocalStore
from imagefs.fsck import check, report
from imagefs.gc import collect
from imagefs.handlers import GC_REF, GC_ROOT, MEDIATYPE_LABEL
from imagefs.units import human
from tests.support.cachefiles import flip_byte
from tests.support.mounting import Mount, imagefs

AMD64 = ("--platform", "linux/amd64")


def blob_path(cache_dir, digest):
    return cache_dir / "blobs" / "sha256" / digest.split(":")[1]


def fsck(cache_dir, *extra):
    done = imagefs("fsck", "--cache-dir", cache_dir, *extra)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, done.stdout


def test_blob_corrupted_on_disk_is_found_removed_and_fetched_again(proxy, images, cache_dir, tmp_path):
    layer = images.d_amd.layers[-1]
    with Mount(f"{proxy.host}/test/docker:v1", tmp_path / "m", cache_dir, *AMD64) as m:
        for digest, b in images.d_amd.blobs.items():
            (path,) = m.mountpoint.glob(f"*-{digest}")
            assert (path / "blob").read_bytes() == b.data
    size = human(images.docker.index.size + sum(b.size for b in images.d_amd.blobs.values()))
    assert fsck(cache_dir) == (0, f"fsck: checked 5 blobs ({size}), 0 ingests, 1 tags: clean\n")

    p = blob_path(cache_dir, layer.digest)
    flip_byte(p, layer.size // 2)
    code, out = fsck(cache_dir)
    assert code == 1
    assert f"fsck: blob {layer.digest}: content has digest sha256:" in out
    assert "1 problem found, not repaired" in out
    assert p.exists(), "without --repair nothing changes"

    code, out = fsck(cache_dir, "--repair")
    assert code == 1 and "(removed)" in out and "1 problem found, repaired" in out
    assert not p.exists()
    assert run_check(LocalStore(cache_dir))[0].problems == []

    before = proxy.bytes_sent(layer.digest)
    with Mount(f"{proxy.host}/test/docker:v1", tmp_path / "m2", cache_dir, *AMD64) as m:
        assert hashlib.sha256(m.path(f"layer-{layer.digest}", "blob").read_bytes()).hexdigest() == layer.digest[7:]
    assert proxy.bytes_sent(layer.digest) == before + layer.size, "the mount fetched it again"
    assert run_check(LocalStore(cache_dir))[1].endswith(": clean\n")


def put(store: LocalStore, data: bytes, labels: dict[str, str]) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    p = store.blobs / digest[7:]
    p.write_bytes(data)
    p.chmod(0o444)
    store.update_labels(digest, labels)
    return digest


def manifest_with(store: LocalStore, n_layers: int, *, label_refs: int | None = None) -> tuple[str, list[str]]:
    """An image manifest and its blobs in the store; only the first ``label_refs`` gc.ref labels."""
    config = put(store, b'{"architecture":"amd64","os":"linux"}', {MEDIATYPE_LABEL: d.OCI_CONFIG})
    layers = [put(store, f"layer {i}".encode(), {MEDIATYPE_LABEL: d.OCI_LAYER_GZIP}) for i in range(n_layers)]
    body = json.dumps({
        "schemaVersion": 2, "mediaType": d.OCI_MANIFEST,
        "config": {"mediaType": d.OCI_CONFIG, "digest": config, "size": 37},
        "layers": [{"mediaType": d.OCI_LAYER_GZIP, "digest": x, "size": len(f"layer {i}")} for i, x in enumerate(layers)],
    }).encode()
    kids = [config, *layers]
    labels = {MEDIATYPE_LABEL: d.OCI_MANIFEST, GC_ROOT: "2024-01-01T00:00:00Z"}
    labels.update({f"{GC_REF}{i}": k for i, k in enumerate(kids[:label_refs])})
    return put(store, body, labels), kids


def run_check(store, repair=False):
    result = check(store, repair=repair)
    out = io.StringIO()
    report(result, out)
    return result, out.getvalue()


def test_labels_cut_short_are_found_rewritten_and_never_cost_content(tmp_path):
    """ext4 keeps all of a file's xattrs in one 4 KiB block: an index of ~35+ entries overflows it."""
    store = LocalStore(tmp_path / "cache")
    man, kids = manifest_with(store, 60, label_refs=20)
    for p in store.root.rglob("*"):
        os.utime(p, (1, 1), follow_symlinks=False)
    # a collector that trusted the labels alone would sweep 41 referenced blobs here
    assert collect(store).removed == ()
    result, out = run_check(store)
    assert len(result.problems) == 1
    assert f"blob {man}: gc.ref labels do not list its 61 children (41 missing, 0 wrong)" in out
    result, out = run_check(store, repair=True)
    assert "(labels rewritten)" in out and "repaired" in out
    labels = store.labels(man)
    assert [labels[f"{GC_REF}{i}"] for i in range(61)] == kids
    assert labels[GC_ROOT] == "2024-01-01T00:00:00Z" and labels[MEDIATYPE_LABEL] == d.OCI_MANIFEST
    assert run_check(store)[0].problems == []


def test_bad_labels_strays_and_bookkeeping(tmp_path):
    store = LocalStore(tmp_path / "cache")
    man, kids = manifest_with(store, 2)
    assert run_check(store)[0].findings == ()
    layer = kids[1]
    # a layer without its media type label: its manifest says what it is
    os.removexattr(store.blobs / layer[7:], "user." + MEDIATYPE_LABEL)
    # a gc.ref label that is not a digest
    os.setxattr(store.blobs / man[7:], f"user.{GC_REF}7", b"../../etc/passwd")
    # a blob no manifest lists and without any label: nothing can say what it is
    anon = put(store, b"who am i", {})
    # labels of a blob that is gone; a stray file; a broken ingest; a stale valid one; a bad tag record
    orphan_sidecar = maintenance.sidecar_path(store, "sha256:" + "1" * 64)
    orphan_sidecar.parent.mkdir(parents=True)
    orphan_sidecar.write_text("{}")
    (store.blobs / "not-a-digest").write_text("x")
    broken = store.ingests / f"layer-sha256:{'2' * 64}"
    broken.mkdir()
    (broken / "state").write_text("{not json")
    stale = store.ingests / f"layer-sha256:{'3' * 64}"
    stale.mkdir()
    (stale / "state").write_text(json.dumps({"ref": stale.name, "digest": "sha256:" + "3" * 64, "size": 10}))
    (stale / "data").write_bytes(b"12345")
    tag = store.root / "refs" / "example.com" / "app" / "v1.json"
    tag.parent.mkdir(parents=True)
    tag.write_text("garbage")
    for p in store.root.rglob("*"):
        os.utime(p, (1, 1), follow_symlinks=False)

    result, out = run_check(store)
    messages = {f.subject: f.message for f in result.problems}
    assert messages[f"blob {layer}"] == "no media type label"
    assert "../../etc/passwd" in messages[f"blob {man}"]
    assert messages[f"blob {anon}"] == "no media type label, and no manifest in the store lists it"
    assert f"labels/sha256/{orphan_sidecar.name}" in messages
    assert "blobs/sha256/not-a-digest" in messages
    assert messages[f"ingest {broken.name}"] == "no readable state file"
    assert "tag example.com/app:v1" in messages
    notes = [f for f in result.findings if not f.problem]
    assert [n.subject for n in notes] == [f"ingest {stale.name}"], "a stale ingest is gc's business, not a fault"
    assert len(result.problems) == 7

    result, out = run_check(store, repair=True)
    assert "7 problems found, repaired" in out
    assert store.labels(layer)[MEDIATYPE_LABEL] == d.OCI_LAYER_GZIP
    assert f"{GC_REF}7" not in store.labels(man)
    assert store.path(anon) is None and not orphan_sidecar.exists() and not tag.exists()
    assert not (store.blobs / "not-a-digest").exists()
    result, out = run_check(store)
    assert result.problems == [] and out.endswith("clean\n")


def test_usage_and_missing_cache(tmp_path):
    done = imagefs("fsck", "--cache-dir", tmp_path / "nope")
    assert done.returncode == 1 and done.stderr.startswith("imagefs: no cache at ")
    assert imagefs("fsck", "--bogus").returncode == 2
