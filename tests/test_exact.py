"""What a mount shows exactly as the image says it: nanosecond mtimes, ``.`` and ``..``, and the
layer diff_ids of the config checked wherever a layer is inflated whole anyway."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from imagefs.content.local import LocalStore
from imagefs.layers import diffids, toc
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support.mounting import Mount, imagefs
from tests.test_rootfs import unpack

#: mtimes a GNU tar in POSIX format keeps to the nanosecond (its PAX records drop trailing zeros)
MTIMES = {
    "d": 1699999999_999999999,  # a float rounds this one up into the next second
    "d/f": 1700000000_172353130,
    "d/whole": 1700000000_000000000,
    "g": 1700000000_000000001,
    "old": -1_500000000,  # before the epoch, with a fraction
    "many": 1700000001_5,
}
MANY = 3000  # entries in one directory: several READDIR requests, so offsets must resume right


def gnu_tar_layer(tmp_path: Path) -> im.Blob:
    """A gzip layer that GNU tar wrote (``--format=posix``) from files with sub-second mtimes."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "many").mkdir()
    for name in ("d/f", "d/whole", "g", "old"):
        (src / name).write_text(name)
    for i in range(MANY):
        (src / "many" / f"entry-{i:04d}").write_bytes(b"")
    for name, ns in sorted(MTIMES.items(), key=lambda kv: -kv[0].count("/")):  # files before their directory
        os.utime(src / name, ns=(ns, ns), follow_symlinks=False)
    tar = tmp_path / "layer.tar"
    subprocess.run(["tar", "--format=posix", "--pax-option=delete=atime,delete=ctime", "--sort=name",
                    "--owner=0", "--group=0", "--numeric-owner", "-C", src, "-cf", tar, "d", "g", "old", "many"],
                   check=True, capture_output=True)
    return im.Blob(im.OCI_LAYER_GZIP, im.compress(tar.read_bytes(), "gzip"))


@pytest.fixture(scope="module")
def ns_image(registry, tmp_path_factory):
    layer = gnu_tar_layer(tmp_path_factory.mktemp("gnutar"))
    img = im.image([layer])
    push(registry.host, "exact/ns", img, "v1")
    return img


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*") if "entry-" not in p.name}


def test_pax_mtimes_are_exact_to_the_nanosecond(registry, ns_image, tmp_path, cache_dir):
    want = mtimes(unpack(registry, "exact/ns", tmp_path))
    assert {k: want[k] for k in MTIMES} == MTIMES, "umoci keeps nanoseconds too"
    for n in (1, 2):  # the index built from the tar, then the persisted one
        with Mount(f"{registry.host}/exact/ns:v1", tmp_path / f"m{n}", cache_dir) as m:
            assert mtimes(m.path("rootfs")) == want
            assert mtimes(m.path(f"layer-{ns_image.layers[0].digest}", "fs")) == want
            shown = subprocess.run(["stat", "-c", "%y", m.path("rootfs/d/f")], capture_output=True, text=True, check=True)
            assert shown.stdout.split()[1] == "22:13:20.172353130"
            st = m.path("rootfs/d/f").stat()
            assert st.st_atime_ns == st.st_ctime_ns == MTIMES["d/f"]
        assert ("indexed layer-" in m.log_text()) == (n == 1), m.log_text()


def test_toc_modtimes_are_exact_to_the_nanosecond():
    rows = [{"name": "d/", "type": "dir", "mode": 0o755, "modtime": "2023-11-14T22:13:20.17235313Z"},
            {"name": "z", "type": "dir", "mode": 0o755, "modtime": "2023-11-15T00:13:20.000000001+02:00"},
            {"name": "s", "type": "dir", "mode": 0o755, "modtime": "2023-11-14T22:13:20Z"},
            {"name": "bad", "type": "dir", "mode": 0o755, "modtime": "yesterday"}]
    raw = json.dumps({"version": 1, "entries": rows}).encode()
    got = {e.path: e.mtime for e in toc.parse(raw, toc.ESTARGZ, "sha256:" + "0" * 64, "t", 0, checksum="").index.entries}
    assert got == {"d": 1700000000_172353130, "z": 1700000000_000000001, "s": 1700000000_000000000, "bad": 0}
    assert all(type(v) is int for v in got.values())


def ls_a(path: Path) -> list[str]:
    """``ls -a`` in readdir order (-f: unsorted), one name a line."""
    return subprocess.run(["ls", "-a1f", path], capture_output=True, text=True, check=True).stdout.splitlines()


def inode_of(path: Path, name: str) -> int:
    out = subprocess.run(["ls", "-ai1f", path], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0]) for line in out.splitlines() if line.split()[1] == name)


def test_dot_and_dotdot_are_listed(registry, ns_image, mnt, cache_dir):
    with Mount(f"{registry.host}/exact/ns:v1", mnt, cache_dir) as m:
        manifest = m.path(f"manifest-{ns_image.digest}")
        places = {
            # the top's ".." is ours (its own inode) in the listing, but ls shows what the kernel
            # resolves it to: the directory the mount covers a part of
            m.mountpoint: m.mountpoint.parent,
            manifest: m.mountpoint,
            m.path("blobs", "sha256"): m.path("blobs"),
            manifest / "rootfs": manifest,
            m.path("rootfs", "d"): manifest / "rootfs",
            m.path("rootfs", "many"): manifest / "rootfs",
            m.path(f"layer-{ns_image.layers[0].digest}", "fs", "d"): m.path(f"layer-{ns_image.layers[0].digest}", "fs"),
        }
        for place, parent in places.items():
            names = ls_a(place)
            assert names[:2] == [".", ".."], place
            rest = names[2:]
            assert len(rest) == len(set(rest)) and sorted(rest) == sorted(e.name for e in os.scandir(place)), place
            assert inode_of(place, ".") == os.lstat(place).st_ino, place
            assert inode_of(place, "..") == os.lstat(parent).st_ino, place
        assert len(ls_a(m.path("rootfs", "many"))) == MANY + 2
        assert os.lstat(m.mountpoint).st_ino == 1


# -- diff_ids ---------------------------------------------------------------------------------------

WRONG = im.digest_of(b"not this layer's tar")


@pytest.fixture(scope="module")
def diff_images(registry):
    """The same three layers (gzip, zstd, plain tar) under a right config and under one whose
    diff_ids are wrong for the first two."""
    gz = im.tar_layer({"etc/gz": b"gzip layer\n"})
    zs = im.tar_layer({"etc/zs": b"zstd layer\n"}, compression="zstd")
    plain = im.tar_layer({"etc/plain": b"plain layer\n"}, compression="none")
    layers = [gz, zs, plain]
    right = im.image(layers)
    wrong = im.image(layers, config_extra={"rootfs": {"type": "layers", "diff_ids": [WRONG, WRONG, im.diff_id(plain)]}})
    push(registry.host, "exact/diffid", right, "right")
    push(registry.host, "exact/diffid", wrong, "wrong")
    return right, wrong


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if "inflates to" in line]


def assert_names_both(lines: list[str], img: im.Image, *, image: str) -> None:
    """One warning for each of the two wrong layers, naming it, what it inflates to, the diff_id
    listed and the image."""
    assert len(lines) == 2, lines
    for layer in img.layers[:2]:
        line = next(ln for ln in lines if f"layer-{layer.digest}" in ln)
        assert im.diff_id(layer) in line and WRONG in line and image in line and "WARNING" in line.upper(), line


def test_a_wrong_diff_id_is_a_warning_in_the_mount_log(registry, diff_images, tmp_path):
    _, wrong = diff_images
    for n in (1, 2):  # the index pass inflates the layers; the second mount loads their indexes
        with Mount(f"{registry.host}/exact/diffid:wrong", tmp_path / f"w{n}", tmp_path / "cw") as m:
            assert sorted(os.listdir(m.path("rootfs/etc"))) == ["gz", "plain", "zs"], "a warning, not a refusal"
            assert m.path("rootfs/etc/zs").read_bytes() == b"zstd layer\n"
        assert_names_both(warnings_in(m.log_text()), wrong, image=f"manifest-{wrong.digest}")
        assert ("indexed layer-" in m.log_text()) == (n == 1)
    with Mount(f"{registry.host}/exact/diffid:right", tmp_path / "r", tmp_path / "cr") as m:
        assert sorted(os.listdir(m.path("rootfs/etc"))) == ["gz", "plain", "zs"]
    assert "indexed layer-" in m.log_text() and warnings_in(m.log_text()) == []


def test_a_wrong_diff_id_is_a_warning_of_pull_and_fsck(registry, diff_images, tmp_path):
    _, wrong = diff_images
    ref = f"{registry.host}/exact/diffid:wrong"
    for n in (1, 2):  # inflated the first time; the second reads the label the first one left
        done = imagefs("pull", ref, "--cache-dir", tmp_path / "cw", check=True)
        assert_names_both(warnings_in(done.stderr), wrong, image=ref)
        assert done.stdout.splitlines()[-1].endswith("; 2 diff_id warnings") and warnings_in(done.stdout) == []
    checked = imagefs("fsck", "--cache-dir", tmp_path / "cw")
    assert checked.returncode == 0, checked.stdout  # a warning: the cache holds what the registry does
    lines = warnings_in(checked.stdout)
    assert all(line.startswith("fsck: warning: layer-sha256:") for line in lines)
    assert_names_both(lines, wrong, image=f"manifest {wrong.digest} ({ref})")
    assert checked.stdout.splitlines()[-1].endswith(": clean (2 warnings)")

    done = imagefs("pull", f"{registry.host}/exact/diffid:right", "--cache-dir", tmp_path / "cr", check=True)
    assert warnings_in(done.stdout + done.stderr) == [] and done.stderr == ""
    checked = imagefs("fsck", "--cache-dir", tmp_path / "cr")
    assert checked.returncode == 0 and "warning" not in checked.stdout and checked.stdout.endswith(": clean\n")


def test_fsck_finds_an_uncompressed_label_that_lies_and_rewrites_it(registry, diff_images, tmp_path):
    right, _ = diff_images
    cache = tmp_path / "c"
    imagefs("pull", f"{registry.host}/exact/diffid:right", "--cache-dir", cache, check=True)
    store, gz = LocalStore(cache), right.layers[0]
    assert store.labels(gz.digest)[diffids.LABEL] == im.diff_id(gz), "pull labels what it inflated"
    store.update_labels(gz.digest, {diffids.LABEL: WRONG})
    done = imagefs("fsck", "--cache-dir", cache)
    assert done.returncode == 1 and f"label {diffids.LABEL}='{WRONG}', but it inflates to {im.diff_id(gz)}" in done.stdout
    assert imagefs("fsck", "--repair", "--cache-dir", cache).returncode == 1
    assert store.labels(gz.digest)[diffids.LABEL] == im.diff_id(gz)
    assert imagefs("fsck", "--cache-dir", cache).returncode == 0


def test_skopeos_zstd_chunked_layer_is_reported_by_pull(registry, tmp_path):
    """skopeo 1.9.3's zstd:chunked tar lacks the original's trailing padding, yet its config keeps
    the original diff_id: a real producer's wrong diff_id, found by pull (which inflates it)."""
    src = im.image([im.tar_layer({"etc/a": b"a" * 100_000, "etc/b": im.random_bytes(300_000, 5)})])
    push(registry.host, "exact/zc-src", src, "v1")
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
                    "--dest-compress-format", "zstd:chunked", f"docker://{registry.host}/exact/zc-src:v1",
                    f"docker://{registry.host}/exact/zc:v1"], check=True, capture_output=True, timeout=60)
    ref = f"{registry.host}/exact/zc:v1"
    done = imagefs("pull", ref, "--cache-dir", tmp_path / "c", check=True)
    [line] = warnings_in(done.stderr)
    assert im.diff_id(src.layers[0]) in line and ref in line and "WARNING" in line
    store = LocalStore(tmp_path / "c")
    manifest = json.loads(store.read(line.split(" (manifest-")[1].split(")")[0]))
    layer = manifest["layers"][0]
    inflated = im.digest_of(im.uncompressed(store.read(layer["digest"])))  # inflated by other code
    assert f"layer-{layer['digest']} inflates to {inflated}," in line and layer["mediaType"].endswith("+zstd")
    assert inflated != im.diff_id(src.layers[0])
