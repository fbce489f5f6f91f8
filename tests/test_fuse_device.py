"""A machine where ``/dev/fuse`` cannot be opened: one line that says what to do, no traceback.

The device is replaced by a path that fails to open (as root, only a missing device or a
directory fails: permissions do not stop root), in-process for :func:`serve` and in a child
process for the whole ``imagefs mount -f`` command.
"""

import logging
import subprocess
import sys

import pytest

from imagefs.errors import FuseUnavailable
from imagefs.fs import mount


async def test_serve_refuses_in_one_line_before_any_network(tmp_path, monkeypatch, caplog):
    missing = tmp_path / "no-fuse"
    monkeypatch.setattr(mount, "FUSE_DEVICE", str(missing))
    (tmp_path / "mnt").mkdir()
    caplog.set_level(logging.DEBUG)
    # a registry nothing listens on: reaching it would be a different error
    opts = mount.MountOptions("127.0.0.1:9/nothing/here:v1", tmp_path / "mnt", tmp_path / "cache")
    with pytest.raises(FuseUnavailable) as info:
        await mount.serve(opts)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot open {missing}: No such file or directory — ")
    assert "modprobe fuse" in message
    assert not any(r.exc_info for r in caplog.records), "no traceback in the log"


def test_check_says_what_to_do_for_each_cause(tmp_path):
    with pytest.raises(FuseUnavailable, match="modprobe fuse"):
        mount.check_fuse_device(str(tmp_path / "absent"))
    with pytest.raises(FuseUnavailable, match="Is a directory"):
        mount.check_fuse_device(str(tmp_path))
    mount.check_fuse_device()  # the real one opens here (the suite runs as root)


def test_the_mount_command_prints_one_line(tmp_path):
    (tmp_path / "mnt").mkdir()
    code = ("import sys; import imagefs.fs.mount as m; m.FUSE_DEVICE = sys.argv[1]; "
            "from imagefs.cli import main; sys.exit(main(sys.argv[2:]))")
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "no-fuse"), "mount", "-f", "--no-passthrough",
         "127.0.0.1:9/nothing/here:v1", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("imagefs: cannot open ") and "modprobe fuse" in lines[0]
    assert "Traceback" not in done.stderr
