"""Checks on a mount point, kept apart from :mod:`.mount` so the command that starts a background
mount can refuse a bad one without loading pyfuse3, trio and httpx (a third of a second here)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MountError


def check_mountpoint(path: Path) -> None:
    """Refuse, before any network, a mount point a user cannot mean."""
    if not path.exists():
        raise MountError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point (imagefs umount {path} first)")
