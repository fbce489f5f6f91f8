"""A full disk during a fetch: the reader gets EIO (or ENOSPC), the mount lives on, the store stays
consistent. The cache is a 2 MiB tmpfs; the layer read is 3 MiB."""

import errno
import hashlib
import os
import subprocess

import pytest

from tests.support.mounting import Mount

AMD64 = ("--platform", "linux/amd64")


@pytest.fixture
def small_cache(tmp_path):
    # root, like the whole suite (FUSE); a non-root run fails here loudly rather than skipping
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        yield disk / "cache"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def read_errno(path) -> int | None:
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError as exc:
        return exc.errno
    return None


def test_full_disk_gives_eio_and_the_mount_lives_on(proxy, images, small_cache, tmp_path):
    """Found by this test: the progress record (``state``) and the unmount's ``suspend`` wrote to the
    full disk unguarded, and the ENOSPC ended the whole mount (ENOTCONN for every reader)."""
    big = images.shared  # 3 MiB of random data: cannot fit
    small = images.amd.layers[-1]
    with Mount(f"{proxy.host}/test/oci:v1", tmp_path / "m", small_cache, *AMD64) as m:
        assert m.path(f"layer-{small.digest}", "blob").read_bytes() == small.data
        assert read_errno(m.path(f"layer-{big.digest}", "blob")) in (errno.EIO, errno.ENOSPC)
        # still serving: a listing, a committed manifest, a committed layer
        assert f"layer-{big.digest}" in os.listdir(m.mountpoint)
        assert m.path("root", "blob").read_bytes() == images.oci.index.data
        assert m.path(f"layer-{small.digest}", "blob").read_bytes() == small.data
        assert "No space left on device" in m.log_text()
    # nothing partial or corrupt was committed
    blobs = small_cache / "blobs" / "sha256"
    for f in blobs.iterdir():
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
    assert not (blobs / big.digest[7:]).exists()
    assert "unmounted" in m.log_text(), "the mount ended cleanly, not by a crash"
