"""Mounting through the real command line, as a user does: ``imagefs mount`` returns once the
mount is ready and a background process serves it; ``imagefs umount`` ends it.

:meth:`Mount.unmount` returns once that process has exited, so a test that checks the cache right
after the mount finds it as the mount left it (a shielded commit finished, its mount record gone)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

IMAGEFS = [sys.executable, "-m", "imagefs"]
#: How long :meth:`Mount.unmount` waits for the server to log "unmounted" and exit (a loaded CI
#: machine can be slow; the wait ends as soon as it has).
UNMOUNT_WAIT = 30.0


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
        self.server = server(self.mountpoint)
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            done = imagefs("umount", self.mountpoint)
            if done.returncode != 0:  # a reader still busy: lazy-unmount so the test run goes on
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        deadline = time.monotonic() + UNMOUNT_WAIT
        while time.monotonic() < deadline and not self._ended():
            time.sleep(0.02)

    def _ended(self) -> bool:
        if self.server is not None:  # once it has exited, every line it logged is in the file
            return not running(self.server)
        return "unmounted" in self.log_text()

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def server(mountpoint: Path) -> tuple[int, str] | None:
    """(pid, start time) of the background process serving ``mountpoint`` (``mount ... --ready-fd``)."""
    want = str(mountpoint).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"--ready-fd" in args and want in args:
            fields = _stat(int(entry))
            if fields is not None:
                return int(entry), fields[19]
    return None


def running(proc: tuple[int, str]) -> bool:
    """Whether that process still runs: not gone, not a zombie (it has exited, and only init
    reaps it), not its pid reused."""
    fields = _stat(proc[0])
    return fields is not None and fields[0] != "Z" and fields[19] == proc[1]
