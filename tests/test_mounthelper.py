"""``mount -t fuse.imagefs`` and fstab lines, through util-linux mount and our /sbin helper.

mount(8) finds ``/sbin/mount.fuse.imagefs`` by the type's name; mount.sh installs it, and so does
this module (idempotently) so the tests also run outside mount.sh. The real /etc/fstab is never
touched: ``mount -T FILE`` reads a private one.
"""

import os
import subprocess
import time

import pytest

from imagefs import mounthelper
from imagefs.content import mounts



@pytest.fixture(scope="module", autouse=True)
def helper():
    assert mounthelper.install() == 0
    assert mounthelper.HELPER_PATH.read_text() == mounthelper.script(__import__("sys").executable)
    assert os.access(mounthelper.HELPER_PATH, os.X_OK)


def mount(*args):
    return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, timeout=60)


def umount(path):
    done = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def findmnt(path) -> tuple[str, str]:
    out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(path)], capture_output=True, text=True).stdout
    source, fstype = out.split()
    return source, fstype


def wait_unregistered(cache_dir):
    deadline = time.monotonic() + 10
    while mounts.scan(cache_dir).live and time.monotonic() < deadline:
        time.sleep(0.05)
    return mounts.scan(cache_dir)


def test_mount_t_fuse_imagefs_with_options_then_plain_umount(proxy, images, mnt, cache_dir, tmp_path):
    ref = f"{proxy.host}/test/oci:v1"
    log = tmp_path / "helper.log"
    done = mount("-t", "fuse.imagefs", ref, mnt,
                 "-o", f"ro,noauto,_netdev,nodev,user,cache_dir={cache_dir},platform=linux/arm64,log_file={log}")
    assert done.returncode == 0, done.stderr
    try:
        assert os.path.ismount(mnt)
        assert findmnt(mnt) == (ref, "fuse.imagefs")
        names = os.listdir(mnt)
        assert f"manifest-{images.arm.digest}" in names and f"config-{images.arm.config.digest}" in names
        assert f"config-{images.amd.config.digest}" not in names, "platform=linux/arm64 selected arm64"
        (rec,) = mounts.live_mounts(cache_dir)
        assert rec.selected == (images.arm.digest,) and rec.mountpoint == str(mnt)
        assert log.exists()
    finally:
        umount(mnt)  # util-linux umount, not imagefs umount: the server notices and exits cleanly
    assert not os.path.ismount(mnt)
    assert wait_unregistered(cache_dir).live == []


def test_fstab_line_with_mount_T(proxy, images, mnt, cache_dir, tmp_path):
    ref = f"{proxy.host}/test/oci@{images.oci.digest}"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# imagefs test\n{ref}  {mnt}  fuse.imagefs  ro,noauto,x-systemd.automount,"
                     f"cache_dir={cache_dir},all_platforms,plain_http  0  0\n")
    done = mount("-T", fstab, mnt)
    assert done.returncode == 0, done.stderr
    try:
        names = os.listdir(mnt)
        assert f"config-{images.amd.config.digest}" in names and f"config-{images.arm.config.digest}" in names
        assert os.readlink(mnt / "root") == f"index-{images.oci.digest}"
    finally:
        umount(mnt)


def test_errors_are_one_line_with_mount_exit_codes(proxy, mnt, cache_dir):
    done = mount("-t", "fuse.imagefs", f"{proxy.host}/test/oci:v1", mnt, "-o", "bogus=1")
    assert done.returncode == 1 and "unknown mount option 'bogus=1'" in done.stderr
    done = mount("-t", "fuse.imagefs", f"{proxy.host}/test/missing:v1", mnt, "-o", f"cache_dir={cache_dir}")
    assert done.returncode == 32
    assert done.stderr.strip().endswith("manifest unknown (the registry has no such tag or digest)")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mnt)


def test_option_translation():
    argv, ignored = mounthelper.translate(
        ["ro", "defaults", "_netdev", "allow_other", "x-systemd.requires=network-online.target", "cache_dir=/c",
         "platform=linux/arm64/v8", "all-platforms", "plain_http", "ca_file=/ca.pem", "debug", ""])
    assert argv == ["--cache-dir", "/c", "--platform", "linux/arm64/v8", "--all-platforms", "--plain-http",
                    "--ca-file", "/ca.pem", "--debug"]
    assert ignored == ["ro", "defaults", "_netdev", "allow_other", "x-systemd.requires=network-online.target"]
    for bad, message in (["nope"], "unknown mount option"), (["cache_dir"], "needs a value"), (["plain_http=1"], "takes no value"):
        with pytest.raises(mounthelper.UsageError, match=message):
            mounthelper.translate(bad)
    for internal in ("foreground", "ready_fd=3", "password_stdin"):
        with pytest.raises(mounthelper.UsageError):
            mounthelper.translate([internal])
    assert mounthelper.translate(["nope", "debug"], sloppy=True) == (["--debug"], ["nope"])
    src, mp, opts, sw = mounthelper.parse_helper_argv(["imagefs#reg/x:1", "/m", "-sv", "-o", "ro,debug", "-t", "fuse.imagefs"])
    assert (src, mp, opts, sw["sloppy"], sw["verbose"], sw["fake"]) == ("reg/x:1", "/m", ["ro", "debug"], True, True, False)
    assert mounthelper.main(["reg/x:1", "/m", "-f", "-o", "debug"]) == 0, "-f (fake) mounts nothing"
    assert mounthelper.main(["only-one"]) == 1
    assert mounthelper.install() == 0, "installing again is quiet and harmless"
