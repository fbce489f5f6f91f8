"""One program in an image's rootfs under bubblewrap, with signals relayed and nothing left behind.

The root is always an overlay made in a private mount namespace (the child's, made just before
it execs ``bwrap``), so it vanishes with the sandbox even after ``kill -9``:

- lowers: a tmpfs holding the mount points bwrap needs (``/etc/resolv.conf``, ``/etc/hosts``,
  ``-v`` targets; a read-only image cannot grow them), above the image's ``rootfs/``;
- ``--writable``: an upper and work dir on that same tmpfs, so writes land in memory and go at exit.

Signals: bwrap does not relay them, so ``imagefs run`` does. The sandbox has its own session
(``--new-session``: no TIOCSTI into the caller's terminal) and bwrap its own process group, so a
Ctrl-C reaches only ``imagefs run``, which sends it on to the program: the first child of bwrap's
pid-namespace init. The chain dies together: ``imagefs run`` -> bwrap (PR_SET_PDEATHSIG) ->
the namespace init (``--die-with-parent``) -> every process in the namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunError

RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Bind:
    host: str
    path: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> "Bind":
        """``HOST:PATH[:ro|rw]`` as ``docker run -v`` takes it (HOST must exist, PATH absolute)."""
        parts = text.split(":")
        mode = parts.pop() if len(parts) == 3 and parts[2] in ("ro", "rw") else "rw"
        if len(parts) != 2 or not parts[0] or not parts[1].startswith("/"):
            raise RunError(f"-v {text!r}: expected HOST:PATH[:ro] with an absolute PATH")
        host = os.path.abspath(parts[0])
        if not os.path.exists(host):
            raise RunError(f"-v {text!r}: {host} does not exist")
        return cls(host, os.path.normpath(parts[1]), mode == "ro")


@dataclass
class Sandbox:
    rootfs: Path  # the image's merged tree (a path without ':' or ',': it goes into overlay options)
    scratch: Path  # an empty directory the private tmpfs is mounted on
    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    writable: bool = False
    binds: list[Bind] = field(default_factory=list)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {fstype or 'propagation'} on {target}")


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _make_root(box: Sandbox) -> str:
    """In this (child) process: a private mount namespace and the overlay root; returns its path."""
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount("none", "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates back to the host
    scratch = str(box.scratch)
    _mount("tmpfs", scratch, "tmpfs", 0, "mode=0755")
    top = os.path.join(scratch, "top")
    stubs = ["/etc/resolv.conf", "/etc/hosts"] + [b.path for b in box.binds]
    os.makedirs(top)
    for d in ("tmp", "proc", "dev"):
        if not os.path.lexists(os.path.join(box.rootfs, d)):
            os.makedirs(os.path.join(top, d))
    for stub in stubs:
        if os.path.isdir(os.path.join(box.rootfs, stub.lstrip("/"))):
            continue
        target = os.path.join(top, stub.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        is_dir = any(b.path == stub and os.path.isdir(b.host) for b in box.binds)
        os.makedirs(target, exist_ok=True) if is_dir else open(target, "a").close()
    merged = os.path.join(scratch, "root")
    os.makedirs(merged)
    options = f"lowerdir={_escape(top)}:{_escape(str(box.rootfs))}"
    if box.writable:
        os.makedirs(os.path.join(scratch, "upper"))
        os.makedirs(os.path.join(scratch, "work"))
        options += f",upperdir={_escape(scratch)}/upper,workdir={_escape(scratch)}/work"
    _mount("overlay", merged, "overlay", 0, options)
    return merged


def bwrap_argv(bwrap: str, box: Sandbox, root: str, info_fd: int) -> list[str]:
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--info-fd", str(info_fd),
            "--bind" if box.writable else "--ro-bind", root, "/",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for name in ("/etc/resolv.conf", "/etc/hosts"):
        argv += ["--ro-bind-try", name, name]
    for b in box.binds:
        argv += ["--ro-bind" if b.read_only else "--bind", b.host, b.path]
    if box.uid or box.gid:
        argv += ["--unshare-user", "--uid", str(box.uid), "--gid", str(box.gid)]
    return [*argv, "--chdir", box.cwd, "--", *box.argv]


def run(bwrap: str, box: Sandbox) -> int:
    """Run ``box`` to its end; the program's exit status, or 128+N if a signal ended it."""
    parent = os.getpid()
    err_r, err_w = os.pipe()
    info_r, info_w = os.pipe()
    root = os.path.join(box.scratch, "root")

    def setup() -> None:  # in the child, before exec: single-threaded, so unshare(CLONE_NEWNS) works
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, list(RELAYED))
            _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            if os.getppid() != parent:
                os._exit(1)
            _make_root(box)
            if box.uid or box.gid:  # bwrap then runs unprivileged in its own user namespace
                os.setgroups([])
                os.setgid(box.gid)
                os.setuid(box.uid)
        except OSError as exc:
            os.write(err_w, str(exc).encode())
            os._exit(125)

    for signum in RELAYED:  # held until the child exists, so none is lost in between
        signal.pthread_sigmask(signal.SIG_BLOCK, [signum])
    try:
        proc = subprocess.Popen(bwrap_argv(bwrap, box, root, info_w), env=box.env, pass_fds=(info_w,),
                                preexec_fn=setup, process_group=0, restore_signals=True)
    finally:
        os.close(err_w)
        os.close(info_w)
    relay = _Relay(info_r)
    previous = {signum: signal.signal(signum, relay) for signum in RELAYED}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, list(RELAYED))
    try:
        code = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(info_r)
    with os.fdopen(err_r, "rb") as pipe:
        failed = pipe.read().decode(errors="replace")
    if failed:
        raise RunError(f"cannot make the sandbox's root: {failed}")
    return 128 - code if code < 0 else code


class _Relay:
    """A signal handler: send the signal on to the program (pid 2 of the sandbox's pid namespace)."""

    def __init__(self, info_fd: int) -> None:
        self.info_fd, self.init = info_fd, None

    def program(self) -> int | None:
        if self.init is None:
            try:  # bwrap writes it once the namespace exists; until then a signal finds no program
                self.init = json.loads(os.read(self.info_fd, 4096))["child-pid"]
            except (OSError, ValueError, KeyError):
                return None
        try:
            children = Path(f"/proc/{self.init}/task/{self.init}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def __call__(self, signum: int, frame) -> None:
        pid = self.program()
        for _ in range(100):  # a signal in the first moments: wait (at most 1 s) for the program to exist
            if pid is not None:
                break
            time.sleep(0.01)
            pid = self.program()
        if pid is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
