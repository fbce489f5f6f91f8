"""FUSE passthrough of committed blobs, through real mounts: the kernel reads the cache file itself.

The kernel's rule (an inode's opens are all served by us or all passed through) is the edge to
test: a blob opened while it streamed is committed under that open, and later opens must work.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
import subprocess
import threading
import time

from imagefs.fs import passthrough
from tests.support.mounting import Mount
from tests.test_mount import ref_key, wait_for

AMD64 = ("--platform", "linux/amd64")
MiB = 1 << 20


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def stats(m) -> dict:
    return json.loads(os.getxattr(m.mountpoint, "user.imagefs.statistics"))


def sha256(path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def test_committed_blob_is_read_by_the_kernel(proxy, images, mnt, cache_dir):
    shared = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        blob = m.path(ref_key(shared), "blob")
        assert "sha256:" + sha256(blob) == shared.digest  # cold: streamed and served by the mount
        assert stats(m)["reads"] > 0
        # The kernel sends RELEASE in the background: an open right after the cold one may still be ours.
        assert wait_for(lambda: os.close(os.open(blob, os.O_RDONLY)) or stats(m)["passthrough_opens"] > 0)
        cold = stats(m)
        for _ in range(2):  # committed now: the kernel reads the cache file, no read reaches us
            drop_page_cache(blob)
            assert "sha256:" + sha256(blob) == shared.digest
            assert "sha256:" + sha256(m.path("blobs", "sha256", shared.digest.split(":")[1])) == shared.digest
        warm = stats(m)
        assert warm["passthrough_opens"] == cold["passthrough_opens"] + 6  # 2 x (fadvise + 2 sha256sum)
        assert warm["reads"] == cold["reads"], "a passthrough read reached the mount"
        with open(blob, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert hashlib.sha256(mm).hexdigest() == shared.digest.split(":")[1]
        fd = os.open(blob, os.O_RDONLY)  # closed: an open file keeps the mount busy past the test
        try:
            assert os.pread(fd, 5, shared.size - 2) == shared.data[-2:]
        finally:
            os.close(fd)


def test_open_across_commit_then_passthrough(proxy, images, mnt, cache_dir):
    """Handles opened before the commit are served by us; passthrough starts once they are closed."""
    shared = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        blob = m.path(ref_key(shared), "blob")
        first = os.open(blob, os.O_RDONLY)
        try:
            data = b"".join(iter(lambda: os.read(first, 1 << 20), b""))  # streams, verifies, commits
            assert data == shared.data
            second = os.open(blob, os.O_RDONLY)  # committed, but `first` is a cached open: no passthrough
            assert os.pread(second, 4096, 1000) == shared.data[1000:5096]
            os.close(second)
            assert stats(m)["passthrough_opens"] == 0
        finally:
            os.close(first)
        assert wait_for(lambda: os.close(os.open(blob, os.O_RDONLY)) or stats(m)["passthrough_opens"] > 0)
        before = stats(m)["passthrough_opens"]
        third, fourth = os.open(blob, os.O_RDONLY), os.open(blob, os.O_RDONLY)  # both on one backing file
        try:
            assert os.pread(third, 1 << 20, 0) == shared.data[: 1 << 20]
            assert os.pread(fourth, 100, shared.size - 100) == shared.data[-100:]
        finally:
            os.close(third)
            os.close(fourth)
        assert stats(m)["passthrough_opens"] == before + 2


def drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_no_passthrough_serves_every_read(proxy, images, mnt, cache_dir):
    layer = images.amd.layers[0]
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--no-passthrough") as m:
        blob = m.path(ref_key(layer), "blob")
        assert "sha256:" + sha256(blob) == layer.digest
        for _ in range(3):
            before = stats(m)["reads"]
            drop_page_cache(blob)
            assert "sha256:" + sha256(blob) == layer.digest
            assert stats(m)["reads"] > before
        assert stats(m)["passthrough_opens"] == 0


def test_mount_process_runs_with_the_shim(proxy, images, mnt, cache_dir):
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        pids = subprocess.run(["pgrep", "-f", f"imagefs mount .*{m.mountpoint}"], capture_output=True, text=True).stdout.split()
        assert pids, "no mount process"
        with open(f"/proc/{pids[0]}/maps") as f:
            assert "_passthrough" in f.read()


def test_the_shim_is_not_passed_on(monkeypatch):
    """Programs the mount starts (credential helpers) do not get the shim preloaded."""
    shim = passthrough.shim_path()
    assert shim, "the passthrough shim was not built (pip install -e . builds imagefs/fs/_passthrough.c)"
    monkeypatch.delenv(passthrough._PRELOADED, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/other.so")
    env = passthrough.preload_env()
    assert env["LD_PRELOAD"].split() == [shim, "/usr/lib/other.so"]
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])
    monkeypatch.setenv(passthrough._PRELOADED, shim)
    assert passthrough.preload_env()["LD_PRELOAD"] == env["LD_PRELOAD"]  # once only
    passthrough.forget_preload()
    assert os.environ["LD_PRELOAD"] == "/usr/lib/other.so"
    monkeypatch.setenv(passthrough.ENV, "0")
    assert not passthrough.wanted()


def test_listings_inside_layers_are_kept_by_the_kernel(proxy, images, mnt, cache_dir):
    """A directory inside rootfs/ never changes: after the first listing the kernel answers."""
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        etc = m.path("rootfs", "etc")
        first = sorted(os.listdir(etc))
        assert first == ["arch", "hostname", "os-release"]
        after_first = stats(m)["readdirs"]
        assert after_first > 0
        for _ in range(3):
            assert sorted(os.listdir(etc)) == first
        assert stats(m)["readdirs"] == after_first, "a cached listing reached the mount"
        # The descriptor tree grows as manifests are fetched: its listings are always ours.
        top = sorted(os.listdir(m.mountpoint))
        before = stats(m)["readdirs"]
        assert sorted(os.listdir(m.mountpoint)) == top
        assert stats(m)["readdirs"] > before


def test_the_shim_sends_a_large_reply_without_the_gil():
    """A data reply blocked in writev (here: on a pipe nobody reads yet) must not stop the other
    Python threads, as it would holding the GIL."""
    shim = ctypes.PyDLL(passthrough.shim_path())  # PyDLL: called holding the GIL, as pyfuse3 does
    r, w = os.pipe()
    header = struct.pack("<IiQ", 16 + MiB, 0, 7)  # len, error 0, unique 7: a reply, not INIT or OPEN
    payload = bytes(MiB)
    iov = (Iovec * 2)(Iovec(ctypes.cast(ctypes.c_char_p(header), ctypes.c_void_p), 16),
                      Iovec(ctypes.cast(ctypes.c_char_p(payload), ctypes.c_void_p), MiB))
    shim.writev.restype = ctypes.c_ssize_t
    shim.imagefs_pt_enable(w, 1)
    seen: list[float] = []  # when the other thread ran
    done = threading.Event()

    def count():
        while not done.is_set():
            seen.append(time.monotonic())
            time.sleep(0.001)

    drain = subprocess.Popen(["sh", "-c", "sleep 0.5; cat >/dev/null"], stdin=r)
    counter = threading.Thread(target=count)
    counter.start()
    try:
        start = time.monotonic()
        sent = shim.writev(w, iov, 2)
        end = time.monotonic()
    finally:
        done.set()
        counter.join()
        os.close(w)
        drain.wait()
        os.close(r)
    assert sent == 16 + MiB and end - start > 0.3, "the reply did not wait for its reader"
    assert sum(start + 0.1 < t < end - 0.1 for t in seen) > 20, "the other thread did not run while the reply waited"
