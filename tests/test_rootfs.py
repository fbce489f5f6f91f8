"""``rootfs/`` and ``layer-…/fs/`` through real mounts, compared entry by entry with ``umoci unpack``."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from imagefs.layers import entries
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support.mounting import Mount
from tests.support.tars import M, dir_, layer

LONG = "usr/share/" + "very-long-directory-name-" * 5 + "/file.txt"
BIG = im.random_bytes(12 << 20, 11)


class RootfsImages:
    def __init__(self, registry) -> None:
        host = registry.host
        base = layer([
            dir_("./"), dir_("./etc"), M("./etc/os-release", b'NAME="rootfs test"\n'),
            M("./etc/issue", kind=tarfile.SYMTYPE, link="os-release", mode=0o777),
            dir_("./bin"), M("./bin/busybox", b"#!busybox\n" * 300, mode=0o755),
            M("./bin/ls", kind=tarfile.LNKTYPE, link="./bin/busybox"),
            M("./bin/cat", kind=tarfile.LNKTYPE, link="bin/busybox"),
            M("./bin/sh", kind=tarfile.SYMTYPE, link="/bin/busybox", mode=0o777),
            dir_("./usr"), dir_("./usr/bin"), M("./usr/bin/su", b"su", mode=0o4755),
            M("./usr/bin/wall", b"wall", mode=0o2755, gid=5),
            dir_("./tmp", 0o1777), dir_("./home"), dir_("./home/u", 0o700), M("./home/u/.profile", b"PS1=$\n", uid=1000, gid=1000),
            dir_("./dev"), M("./dev/null", kind=tarfile.CHRTYPE, major=1, minor=3, mode=0o666),
            M("./dev/loop0", kind=tarfile.BLKTYPE, major=7, minor=0, mode=0o660, gid=6),
            M("./dev/initctl", kind=tarfile.FIFOTYPE, mode=0o600),
            dir_("./a"), M("./a/x", b"x"), M("./a/y", b"y"),
            dir_("./b"), dir_("./b/deep"), M("./b/deep/f", b"f"),
            dir_("./o"), M("./o/old", b"old"), M("./keep", b"v1"), M("./gone", b"gone"),
            dir_("./usr/share"), dir_("./usr/share/" + "very-long-directory-name-" * 5), M("./" + LONG, b"long\n"),
            M("./caps", b"caps", pax={"SCHILY.xattr.user.imagefs.test": "hello"}),
        ])
        upper = layer([
            M("a/.wh.x"), M(".wh.b"), M(".wh.gone"), dir_("o"), M("o/new", b"new"), M("o/.wh..wh..opq"),  # opaque after an entry
            M(".wh..wh.plnk"), M("keep", b"version two\n"), M("bin/ls2", kind=tarfile.LNKTYPE, link="bin/busybox"),
        ])
        plain = im.tar_layer({"etc/plain.txt": b"from a plain tar\n"}, compression="none")
        self.amd = im.image([base, upper, plain], platform={"os": "linux", "architecture": "amd64"})
        self.arm = im.image([base, im.tar_layer({"etc/arch": b"arm64\n"})],
                            platform={"os": "linux", "architecture": "arm64", "variant": "v8"})
        self.base, self.upper = base, upper
        push(host, "rootfs/multi", im.index([self.amd, self.arm]), "v1")

        dbase = im.tar_layer({"etc/os-release": b"docker\n", "var/lib/x": b"x", "var/cache/y": b"y"}, media="docker")
        dtop = im.tar_layer({im.whiteout("var/lib"): b"", "var/cache/" + im.OPAQUE_WHITEOUT: b"", "var/cache/z": b"z"}, media="docker")
        self.docker = im.image([dbase, dtop], media="docker")
        push(host, "rootfs/docker", self.docker, "v1")

        self.lazy_layer = im.tar_layer({"etc/small": b"small file\n", "opt/big": BIG})
        self.lazy = im.image([self.lazy_layer])
        push(host, "rootfs/lazy", self.lazy, "v1")

        hostile = layer([
            M("../escape", b"no"), M("/abs", b"no"), M("ok/../../up", b"no"), M("x", b"1"), M("x", b"2"),
            M("hl", kind=tarfile.LNKTYPE, link="../../etc/shadow"), M("hl2", kind=tarfile.LNKTYPE, link="/etc/passwd"),
            M("sym", kind=tarfile.SYMTYPE, link="../../../../etc/shadow"),
        ])
        many = layer([dir_(f"d{i}") for i in range(20)] + [M(f"d{i % 20}/f{i}", b"") for i in range(20_000)])
        self.hostile = im.image([hostile, many])
        push(host, "rootfs/hostile", self.hostile, "v1")

        # zstandard is a dependency: this layer always exists and its test always runs
        self.zstd = im.image([im.tar_layer({"etc/z": b"zstd data\n", "opt/big": BIG[: 3 << 20]}, compression="zstd"),
                              im.tar_layer({"opt/.wh.big": b""}, compression="zstd")])
        push(host, "rootfs/zstd", self.zstd, "v1")


@pytest.fixture(scope="session")
def rimages(registry) -> RootfsImages:
    return RootfsImages(registry)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: type, permission bits, owner, size, link target, content digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            rec = [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(kind):
                rec += [st.st_size, hashlib.sha256(p.read_bytes()).hexdigest(), st.st_nlink]
            elif stat.S_ISLNK(kind):
                rec.append(os.readlink(p))
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                rec.append(st.st_rdev)
            out[str(p.relative_to(root))] = tuple(rec)
    return out


def unpack(registry, repo: str, tmp_path: Path, *extra: str) -> Path:
    """The independent answer: skopeo copies the image to an OCI layout, umoci unpacks it."""
    layout, bundle = tmp_path / "oci", tmp_path / "bundle"
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", *extra, f"docker://{registry.host}/{repo}:v1", f"oci:{layout}:v1"],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True, timeout=60)
    return bundle / "rootfs"


@pytest.mark.parametrize("repo", ["rootfs/multi", "rootfs/docker"])
def test_rootfs_equals_umoci_unpack(registry, rimages, tmp_path, mnt, cache_dir, repo):
    want = snapshot(unpack(registry, repo, tmp_path))
    with Mount(f"{registry.host}/{repo}:v1", mnt, cache_dir, "--platform", "linux/amd64") as m:
        got = snapshot(m.path("rootfs"))
        assert "unmounted" not in m.log_text()
        assert "Traceback" not in m.log_text(), m.log_text()
    differ = sorted((k, got.get(k), want.get(k)) for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    assert differ == []


def test_layout_whiteouts_links_and_xattrs(registry, rimages, mnt, cache_dir):
    with Mount(f"{registry.host}/rootfs/multi:v1", mnt, cache_dir, "--platform", "linux/amd64") as m:
        root = m.path("rootfs")
        assert os.readlink(m.path("rootfs")) == f"{rimages.amd.manifest.digest.replace('sha256:', 'manifest-sha256:')}/rootfs"
        names = set(os.listdir(root))
        assert {"a", "o", "keep", "etc", "bin"} <= names and not names & {"b", "gone", ".wh.b", ".wh..wh.plnk"}
        assert os.listdir(root / "a") == ["y"] and os.listdir(root / "o") == ["new"]
        assert (root / "keep").read_bytes() == b"version two\n"
        assert (root / LONG).read_bytes() == b"long\n"
        assert os.readlink(root / "bin/sh") == "/bin/busybox"  # never followed inside the mount
        ino = {os.lstat(root / "bin" / n).st_ino for n in ("busybox", "ls", "cat", "ls2")}
        assert len(ino) == 1 and os.lstat(root / "bin/busybox").st_nlink == 4  # ls2 links a lower layer's file
        assert os.getxattr(root / "caps", "user.imagefs.test") == b"hello"
        assert os.listxattr(root / "caps") == ["user.imagefs.test"] and os.listxattr(root / "etc") == []
        assert os.lstat(root / "usr/bin/su").st_mode & stat.S_ISUID
        # One layer's fs/ shows its tar as it is, whiteouts included.
        upper = m.path(f"layer-{rimages.upper.digest}", "fs")
        assert {".wh.b", ".wh.gone", "a", "o", "keep", ".wh..wh.plnk"} <= set(os.listdir(upper))
        assert set(os.listdir(upper / "o")) == {"new", ".wh..wh..opq"}
        with pytest.raises(OSError) as exc:
            (root / "etc/os-release").write_bytes(b"x")
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with Mount(f"{registry.host}/rootfs/multi:v1", mnt, cache_dir, "--platform", "linux/arm64/v8") as m:
        assert m.path("rootfs/etc/arch").read_bytes() == b"arm64\n"


def test_evicted_blob_reads_only_verified_spans(registry, proxy, rimages, tmp_path, cache_dir):
    ref = f"{proxy.host}/rootfs/lazy:v1"
    digest = rimages.lazy_layer.digest
    with Mount(ref, tmp_path / "m1", cache_dir, "--index"):
        assert entries.index_path(cache_dir, digest).exists()  # built before the mount returned
    (cache_dir / "blobs" / "sha256" / digest.partition(":")[2]).unlink()
    proxy.reset()
    with Mount(ref, tmp_path / "m2", cache_dir) as m:
        t = time.monotonic()
        assert m.path("rootfs/etc/small").read_bytes() == b"small file\n"
        elapsed = time.monotonic() - t
        gets = proxy.gets(f"/blobs/{digest}")
        assert gets and all("range" in h.request_headers for h in gets)
        first = proxy.bytes_sent(digest)
        assert first <= (4 << 20) + (1 << 20) < rimages.lazy_layer.size  # one span, not the blob
        with open(m.path("rootfs/opt/big"), "rb") as f:
            assert os.pread(f.fileno(), 4096, 6 << 20) == BIG[6 << 20 : (6 << 20) + 4096]
        assert proxy.bytes_sent(digest) - first <= (8 << 20)
        assert elapsed < 5
        proxy.corrupt(digest, offset=rimages.lazy_layer.size - 1000)  # a span not read yet
        with open(m.path("rootfs/opt/big"), "rb") as f, pytest.raises(OSError) as exc:
            os.pread(f.fileno(), 4096, len(BIG) - 4096)
        assert exc.value.errno == errno.EIO
        assert "do not match the digest" in m.log_text()


def test_hostile_layers_never_escape_crash_or_hang(registry, rimages, mnt, cache_dir):
    with Mount(f"{registry.host}/rootfs/hostile:v1", mnt, cache_dir) as m:
        root = m.path("rootfs")
        t = time.monotonic()
        top = set(os.listdir(root))
        assert top == {"x", "sym"} | {f"d{i}" for i in range(20)}  # ok/../../up refused whole
        assert (root / "x").read_bytes() == b"2"
        assert sum(len(os.listdir(root / f"d{i}")) for i in range(20)) == 20_000
        assert os.readlink(root / "sym") == "../../../../etc/shadow"
        assert time.monotonic() - t < 30
        assert "escapes the layer" in m.log_text()


def test_zstd_layers(registry, rimages, mnt, cache_dir):
    with Mount(f"{registry.host}/rootfs/zstd:v1", mnt, cache_dir) as m:
        assert m.path("rootfs/etc/z").read_bytes() == b"zstd data\n"
        assert not m.path("rootfs/opt/big").exists()
        layer0 = rimages.zstd.layers[0].digest
        assert hashlib.sha256(m.path(f"layer-{layer0}/fs/opt/big").read_bytes()).digest() == hashlib.sha256(BIG[: 3 << 20]).digest()
