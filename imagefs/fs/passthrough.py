"""FUSE passthrough: the kernel reads a committed blob from the cache file itself.

Once a blob is committed (verified) its bytes never change, so there is no reason for every read
to come up to Python and go back down: Linux >= 6.9 can hand an open file of a FUSE mount to a
*backing file* and serve reads, ``mmap`` included, at local-file speed. libfuse grew an API for it
in 3.16; Debian's is 3.14, so ``_passthrough.c`` (an LD_PRELOAD shim around libfuse's ``read``
and ``writev`` on ``/dev/fuse``) fills in the two fields libfuse cannot set. Python keeps every
decision: which opens pass through, and the backing ids, registered here with the kernel's
``FUSE_DEV_IOC_BACKING_OPEN`` ioctl (root only).

The kernel's rule that shapes :class:`Passthrough`: an inode's open files are either all cached
(served by us) or all passthrough with one backing file. So an inode gets one backing id for the
whole mount, and a blob opened while it was still streaming passes through only after the last of
those earlier handles is released.

Off (every read served by the mount, as before) when the shim is not built, not preloaded, the
kernel does not offer passthrough, we are not root, or ``IMAGEFS_PASSTHROUGH=0``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib.util
import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "IMAGEFS_PASSTHROUGH"  # "0" turns it off
_PRELOADED = "IMAGEFS_PRELOADED"  # set across the re-exec, so it happens once
FH_MAGIC = 0x5054  # top 16 bits of a file handle the shim turns into a passthrough open
DIR_MAGIC = 0x4344  # ... of a directory handle whose listing the kernel may cache (FOPEN_CACHE_DIR)
INODE_MASK = (1 << 48) - 1  # a directory handle is its inode, below the magic
MAX_BACKING_ID = 0xFFFF
BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)


def shim_path() -> str | None:
    """The built shim, or None (not compiled: the extension is optional)."""
    spec = importlib.util.find_spec("imagefs.fs._passthrough")
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".so") else None


def wanted() -> bool:
    return os.environ.get(ENV, "1") != "0" and os.geteuid() == 0 and sys.platform == "linux"


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with the shim preloaded, for starting a mount process."""
    env = dict(os.environ if env is None else env)
    shim = shim_path()
    if wanted() and shim and env.get(_PRELOADED) != shim:
        env["LD_PRELOAD"] = " ".join(p for p in (shim, env.get("LD_PRELOAD", "")) if p)
        env[_PRELOADED] = shim
    return env


def reexec_preloaded(argv: list[str]) -> None:
    """Replace this process with itself, shim preloaded, unless it is already (or cannot be)."""
    shim = shim_path()
    if not (wanted() and shim) or os.environ.get(_PRELOADED) == shim:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "imagefs", *argv], preload_env())


def forget_preload() -> None:
    """Keep the shim out of programs we start (credential helpers): it is only for this process."""
    shim = os.environ.get(_PRELOADED)
    if shim and "LD_PRELOAD" in os.environ:
        rest = [p for p in os.environ["LD_PRELOAD"].split() if p != shim]
        if rest:
            os.environ["LD_PRELOAD"] = " ".join(rest)
        else:
            del os.environ["LD_PRELOAD"]


def _fuse_fd() -> int | None:
    """Our /dev/fuse descriptor: a mount process holds exactly one."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class PassthroughStatistics:
    enabled: bool
    opens: int  # opens the kernel serves from the cache file itself: their reads never reach us
    backing_files: int  # cache files registered with the kernel


class Passthrough:
    """Backing ids per inode, and which opens may pass through."""

    def __init__(self, cache_dir: Path) -> None:
        self.enabled = False
        self._shim = None
        self._fd = -1
        self._backing: dict[int, int] = {}  # inode -> backing id, for the life of the mount
        self._cached_opens: dict[int, int] = {}  # inode -> handles served by us
        self.opens = 0
        shim = os.environ.get(_PRELOADED)
        if not (wanted() and shim and shim == shim_path()):
            log.debug("passthrough off: %s", "shim not preloaded" if wanted() else "not root or disabled")
            return
        try:
            self._shim = ctypes.CDLL(shim)
        except OSError as exc:
            log.debug("passthrough off: %s", exc)
            return
        # Stacking depth the kernel allows under us: one more than the cache's filesystem has.
        self._depth = 2 if _is_overlay(cache_dir) else 1

    def statistics(self) -> PassthroughStatistics:
        return PassthroughStatistics(self.enabled, self.opens, len(self._backing))

    def start(self) -> None:
        """After ``pyfuse3.init`` (the device is open), before the first request is read."""
        if self._shim is None:
            return
        fd = _fuse_fd()
        if fd is None:
            log.debug("passthrough off: no /dev/fuse descriptor found")
            return
        self._fd = fd
        self._shim.imagefs_pt_enable(fd, self._depth)
        self.enabled = True

    def _ready(self) -> bool:
        if not self.enabled:
            return False
        state = self._shim.imagefs_pt_state()
        if state == 1:
            return True
        if state == -1:
            log.info("passthrough off: this kernel does not offer FUSE passthrough (Linux >= 6.9)")
            self.enabled = False
        return False

    def open(self, inode: int, path: Path | None, handle: int) -> int | None:
        """A passthrough file handle for ``inode`` backed by ``path``, or None to serve it ourselves."""
        if path is None or self._cached_opens.get(inode) or not self._ready() or handle > 0xFFFFFFFF:
            return None
        backing = self._backing.get(inode)
        if backing is None:
            backing = self._register(path)
            if backing is None:
                return None
            self._backing[inode] = backing
        self.opens += 1
        return FH_MAGIC << 48 | backing << 32 | handle

    def _register(self, path: Path) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("passthrough: cannot open %s: %s", path, exc)
            return None
        try:
            backing = fcntl.ioctl(self._fd, BACKING_OPEN, bytearray(struct.pack("iIQ", fd, 0, 0)))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                log.info("passthrough off: the kernel refused a backing file (%s)", os.strerror(exc.errno))
                self.enabled = False
            else:
                log.warning("passthrough: backing %s refused (%s); serving it ourselves", path, os.strerror(exc.errno))
            return None
        finally:
            os.close(fd)
        if not 0 < backing <= MAX_BACKING_ID:
            self._close(backing)
            return None
        return backing

    def _close(self, backing: int) -> None:
        try:
            fcntl.ioctl(self._fd, BACKING_CLOSE, bytearray(struct.pack("I", backing)))
        except OSError:
            pass

    def cached_dir(self, inode: int) -> int:
        """The handle for an ``opendir`` of an immutable directory: the kernel keeps its listing."""
        return DIR_MAGIC << 48 | inode if self._fd >= 0 and inode <= INODE_MASK else inode

    @staticmethod
    def is_passthrough(fh: int) -> bool:
        return fh >> 48 == FH_MAGIC

    def cached_open(self, inode: int) -> None:
        self._cached_opens[inode] = self._cached_opens.get(inode, 0) + 1

    def cached_release(self, inode: int) -> None:
        left = self._cached_opens.get(inode, 0) - 1
        if left > 0:
            self._cached_opens[inode] = left
        else:
            self._cached_opens.pop(inode, None)


def _is_overlay(path: Path) -> bool:
    """Whether ``path`` is on overlayfs (statfs's f_type, which os.statvfs does not give)."""
    try:
        with open("/proc/self/mountinfo") as f:
            best, fstype = "", ""
            target = str(Path(path).resolve())
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                mnt = fields[4]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, fields[sep + 1]
            return fstype == "overlay"
    except (OSError, ValueError, IndexError):
        return False
