"""Mounting through the real command line, as a user does: ``imagefs mount`` returns once the
mount is ready and a background process serves it; ``imagefs umount`` ends it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

IMAGEFS = [sys.executable, "-m", "imagefs"]


def imagefs(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run([*IMAGEFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"imagefs {' '.join(map(str, args))} failed ({done.returncode}): {done.stderr}")
    return done


class Mount:
    """A live mount of ``ref`` at ``mountpoint`` with its own cache directory and log file."""

    def __init__(self, ref: str, mountpoint: Path, cache_dir: Path, *extra: str) -> None:
        self.ref, self.mountpoint, self.cache_dir, self.extra = ref, Path(mountpoint), Path(cache_dir), extra
        self.log = self.mountpoint.parent / f"{self.mountpoint.name}.log"

    def __enter__(self) -> "Mount":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        done = imagefs("mount", self.ref, self.mountpoint, "--cache-dir", self.cache_dir, "--log-file", self.log, *self.extra, check=True)
        self.stderr = done.stderr
        assert os.path.ismount(self.mountpoint)
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            done = imagefs("umount", self.mountpoint)
            if done.returncode != 0:  # a reader still busy: lazy-unmount so the test run goes on
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "unmounted" not in self.log_text():
            time.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)
