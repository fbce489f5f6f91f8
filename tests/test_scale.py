"""Big directories and big images: listed whole and right, with the structures that keep them small.

Speed and memory are measured by ``bench/rootfs``, not asserted here; these tests pin what the
fast paths must not break — every name, every attribute, hard links seen by their own name, and
the xattr answers that let ``ls -l`` stop asking.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tarfile

import pytest

from imagefs.layers import entries
from imagefs.layers.entries import DIR, FILE, Entry, LayerIndex
from imagefs.layers.merge import merge
from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support.mounting import Mount
from tests.support.tars import M, dir_, layer

BIG_DIR = 20_000


def big_dir_members() -> list[M]:
    members = [dir_("./usr"), dir_("./usr/lib"), dir_("./usr/lib/many")]
    for i in range(BIG_DIR):
        members.append(M(f"./usr/lib/many/f{i:05d}", b"x" * (i % 5), mode=0o600 if i % 3 else 0o755, uid=i % 7, gid=i % 11))
    members += [
        M("./usr/lib/many/zz-link", kind=tarfile.LNKTYPE, link="usr/lib/many/f00004"),  # a hard link: its own name
        M("./usr/lib/many/zz-sym", kind=tarfile.SYMTYPE, link="f00001", mode=0o777),
        M("./usr/lib/many/zz-caps", b"c", pax={"SCHILY.xattr.user.note": "kept"}),
    ]
    return members


@pytest.fixture(scope="module")
def big_image(registry):
    img = im.image([layer(big_dir_members())])
    push(registry.host, "scale/bigdir", img, "v1")
    return img


def test_a_20000_entry_directory_lists_whole_with_its_attributes(registry, big_image, mnt, cache_dir):
    with Mount(f"{registry.host}/scale/bigdir:v1", mnt, cache_dir) as m:
        many = m.path("rootfs/usr/lib/many")
        names = os.listdir(many)
        assert len(names) == BIG_DIR + 3 and len(set(names)) == len(names)
        assert set(names) == {f"f{i:05d}" for i in range(BIG_DIR)} | {"zz-link", "zz-sym", "zz-caps"}
        # what readdirplus handed the kernel equals what a fresh lookup of each name says
        with os.scandir(many) as it:
            seen = {e.name: e.stat(follow_symlinks=False) for e in it}
        for i in (0, 1, 2, 3, 4, 9_999, BIG_DIR - 1):
            st = seen[f"f{i:05d}"]
            assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (i % 5, 0o600 if i % 3 else 0o755, i % 7, i % 11)
            assert stat.S_ISREG(st.st_mode) and st.st_mtime == im.EPOCH
        assert seen["zz-link"].st_ino == seen["f00004"].st_ino and seen["f00004"].st_nlink == 2
        assert (many / "zz-link").read_bytes() == b"xxxx"  # looked up by its own name, not its target's
        assert os.readlink(many / "zz-sym") == "f00001"
        # ls -l of it all: one line per entry, no error for the xattrs it asks about
        out = subprocess.run(["ls", "-l", str(many)], check=True, capture_output=True, text=True)
        assert out.stderr == "" and len(out.stdout.splitlines()) == BIG_DIR + 3 + 1  # + "total"
        assert "Traceback" not in m.log_text(), m.log_text()


def test_xattrs_outside_user_are_an_unsupported_namespace_not_missing(registry, big_image, mnt, cache_dir):
    """EOPNOTSUPP for security.*/system.* lets coreutils and libacl stop asking per file; user.*
    stays a real namespace (ENODATA when absent) and a tar's own xattrs are served whatever their name."""
    with Mount(f"{registry.host}/scale/bigdir:v1", mnt, cache_dir) as m:
        f = m.path("rootfs/usr/lib/many/f00001")
        for name in ("security.selinux", "system.posix_acl_access"):
            with pytest.raises(OSError) as exc:
                os.getxattr(f, name, follow_symlinks=False)
            assert exc.value.errno == errno.EOPNOTSUPP, name
        with pytest.raises(OSError) as exc:
            os.getxattr(f, "user.absent")
        assert exc.value.errno == errno.ENODATA
        assert os.getxattr(m.path("rootfs/usr/lib/many/zz-caps"), "user.note") == b"kept"
        assert os.listxattr(f) == []
        with pytest.raises(OSError) as exc:  # the descriptor tree too
            os.getxattr(m.path("rootfs"), "security.selinux")
        assert exc.value.errno == errno.EOPNOTSUPP
        assert os.getxattr(m.mountpoint / "root", "user.imagefs.digest").startswith(b"sha256:")


def test_index_round_trips_every_field(tmp_path):
    weird = "bad-\udcff-name"  # a non-UTF-8 byte in a tar name, as tarfile decodes it
    rows = [
        Entry("", DIR, 0o755),
        Entry("etc", DIR, 0o755, mtime=1.5),
        Entry(f"etc/{weird}", FILE, 0o4755, 1000, 1000, 1704067200.0, 12, 1536, rdev=0),
        Entry("etc/cap", FILE, 0o644, size=3, offset=2048, xattrs={"security.capability": b"\x01\x02", "user.k": b"v"}),
        Entry("etc/l", "l", 0o777, target="/abs/target"),
        Entry("etc/h", FILE, 0o644, size=3, offset=2048, link=0),
        Entry("dev/null", "c", 0o666, rdev=os.makedev(1, 3)),
    ]
    idx = LayerIndex("sha256:" + "ab" * 32, entries.GZIP, rows, 4096, [(0, "00" * 32)], b"zran", 2)
    entries.save(tmp_path, idx)
    again = entries.load(tmp_path, idx.digest)
    assert again == idx
    assert again.entries[0].xattrs is entries.NO_XATTRS  # shared, not a dict per member


def test_merged_hands_each_directory_over_once():
    e = lambda p, k=FILE: Entry(p, k, 0o755 if k == DIR else 0o644)  # noqa: E731
    m = merge([[e("a", DIR), e("a/x"), e("a/b", DIR), e("a/b/y"), e("z")]])
    top = m.take("")
    assert [(p, i.entry.path) for p, i in top] == [("a", "a"), ("z", "z")]
    assert [p for p, _ in m.take("a")] == ["a/x", "a/b"] and list(m.children) == ["a/b"]
    assert [p for p, _ in m.take("a/b")] == ["a/b/y"]
    assert m.items == {} and m.children == {}
