"""Kernel-side tuning of a live FUSE mount, done after the mount exists.

The kernel's default readahead for a FUSE mount is 128 KiB, so a streaming reader arrives in small
requests; raising it (``/sys/class/bdi/<dev>/read_ahead_kb``) lets one request carry up to 1 MiB.
``max_background`` (how many async reads the kernel keeps in flight) is raised through fusectl
where it is mounted. Both are best effort: a mount works without them, only slower.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

READ_AHEAD_KB = 4096
MAX_BACKGROUND = 32


def tune(mountpoint: Path, read_ahead_kb: int = READ_AHEAD_KB) -> None:
    """Raise readahead and background reads for the mount at ``mountpoint``.

    Must run off the serving thread: ``stat`` of our own mount point is answered by us.
    """
    dev = os.stat(mountpoint).st_dev
    major, minor = os.major(dev), os.minor(dev)
    _write(Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"), read_ahead_kb)
    fusectl = Path(f"/sys/fs/fuse/connections/{minor}/max_background")
    if fusectl.exists():
        _write(fusectl, MAX_BACKGROUND)


def _write(path: Path, value: int) -> None:
    try:
        path.write_text(f"{value}\n")
        log.debug("%s = %d", path, value)
    except OSError as exc:
        log.debug("cannot set %s: %s", path, exc)
