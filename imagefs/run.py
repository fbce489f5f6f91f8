"""``imagefs run``: mount an image privately, run its Entrypoint + Cmd in ``rootfs/``, unmount.

The mount is its own process (``imagefs mount -f`` with a readiness pipe, as a background mount
is), in its own session so a Ctrl-C meant for the program does not unmount it, and with
PR_SET_PDEATHSIG so that a ``kill -9`` of ``imagefs run`` still makes it unmount and exit.
The program runs under bubblewrap (:mod:`imagefs.sandbox`). Nothing here loads pyfuse3, trio or
httpx: this process stays single-threaded, which the sandbox's ``unshare`` needs.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .descriptors import Platform
from .errors import RunError
from .fs import passthrough
from .sandbox import Bind, Sandbox
from .sandbox import run as run_sandbox

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PREFIX = "imagefs-run-"
UNMOUNT_WAIT = 30.0
_PR_SET_PDEATHSIG = 1


def run(args) -> int:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RunError("bwrap (bubblewrap) is not on PATH: imagefs run needs it (Debian: apt-get install bubblewrap)")
    host = Platform.host()
    if args.platform is not None and not host.matches(args.platform):
        raise RunError(f"cannot run {args.platform} images on this {host} machine")
    binds = [Bind.parse(v) for v in args.volume]
    env_extra = [_env_pair(e) for e in args.env]
    from .content.layout import default_cache_dir

    args.cache_dir = (args.cache_dir or default_cache_dir()).resolve()
    _sweep_stale()
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    work.chmod(0o711)  # a config's User (not root) must reach the sandbox root below it; nothing here is listed
    mount = None
    try:
        (work / "mnt").mkdir()
        (work / "ns").mkdir()
        mount = _Mount(args, work)
        config = mount.config()
        image = Platform.from_json(config)
        if image is not None and not host.matches(image):
            raise RunError(f"{args.ref} is a {image} image: this {host} machine cannot run it")
        box = _sandbox(args, config.get("config") or {}, work, binds, env_extra)
        return run_sandbox(bwrap, box)
    finally:
        if mount is not None:
            mount.stop()
        shutil.rmtree(work, ignore_errors=True)


def _env_pair(text: str) -> tuple[str, str]:
    """``-e K=V``, or ``-e K`` for the value K has here (as ``docker run -e`` reads it)."""
    key, eq, value = text.partition("=")
    if not key:
        raise RunError(f"-e {text!r}: expected NAME=VALUE or NAME")
    return key, value if eq else os.environ.get(key, "")


def _sandbox(args, cfg: dict, work: Path, binds: list[Bind], env_extra: list[tuple[str, str]]) -> Sandbox:
    entrypoint = cfg.get("Entrypoint") or []
    if args.entrypoint is not None:
        entrypoint = [args.entrypoint] if args.entrypoint else []
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    argv = [*entrypoint, *(command or (cfg.get("Cmd") or [] if args.entrypoint is None else []))]
    if not argv:
        raise RunError(f"{args.ref} has no Entrypoint or Cmd: say what to run after --, e.g. imagefs run {args.ref} -- sh")
    rootfs = work / "mnt" / "rootfs"
    env = dict(_split(e) for e in (cfg.get("Env") or [DEFAULT_PATH]) if "=" in e)
    env.setdefault("PATH", DEFAULT_PATH.partition("=")[2])
    uid, gid, home = _user(rootfs, cfg.get("User") or "")
    env.setdefault("HOME", home)
    env.setdefault("HOSTNAME", os.uname().nodename)
    if os.isatty(0) and "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    env.update(env_extra)
    cwd = args.workdir or cfg.get("WorkingDir") or "/"
    return Sandbox(rootfs=rootfs, scratch=work / "ns", argv=argv, env=env, cwd=cwd, uid=uid, gid=gid,
                   writable=args.writable, binds=binds)


def _split(entry: str) -> tuple[str, str]:
    key, _, value = entry.partition("=")
    return key, value


def _user(rootfs: Path, user: str) -> tuple[int, int, str]:
    """The config's ``User`` (name or uid, ``:group`` or ``:gid`` optional) as uid, gid and home,
    looked up in the image's own /etc/passwd and /etc/group."""
    name, _, group = user.partition(":")
    passwd = _table(rootfs / "etc/passwd")
    uid, gid, home = 0, 0, "/root"
    if name:
        row = next((r for r in passwd if name in (r[0], r[2])), None)
        if row is None and not name.isdigit():
            raise RunError(f"the image's User {name!r} is not in its /etc/passwd")
        uid = int(row[2]) if row else int(name)
        gid = int(row[3]) if row else uid
        home = row[5] if row else "/"
    if group:
        row = next((r for r in _table(rootfs / "etc/group") if group in (r[0], r[2])), None)
        if row is None and not group.isdigit():
            raise RunError(f"the image's group {group!r} is not in its /etc/group")
        gid = int(row[2]) if row else int(group)
    return uid, gid, home or "/"


def _table(path: Path) -> list[list[str]]:
    try:
        return [line.split(":") for line in path.read_text().splitlines() if line.count(":") >= 3]
    except OSError:
        return []


def _sweep_stale() -> None:
    """Scratch directories of runs killed with -9 (their mounts are gone: the mount saw to it)."""
    for entry in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = entry.name[len(PREFIX):].partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and not os.path.ismount(entry / "mnt"):
            shutil.rmtree(entry, ignore_errors=True)


class _Mount:
    """The image mounted at ``work/mnt`` by a child ``imagefs mount -f`` that dies with us."""

    def __init__(self, args, work: Path) -> None:
        self.mnt, self.log = work / "mnt", work / "mount.log"
        cmd = [sys.executable, "-m", "imagefs", "mount", args.ref, str(self.mnt), "--foreground",
               "--cache-dir", str(args.cache_dir), "--log-file", str(self.log), *_mount_flags(args)]
        r, w = os.pipe()
        parent = os.getpid()

        def setup() -> None:  # SIGTERM on our death, however we die: the mount unmounts on it
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([*cmd, "--ready-fd", str(w)], pass_fds=(w,), stdout=logf, stderr=logf,
                                         stdin=subprocess.DEVNULL if args.password is None else subprocess.PIPE,
                                         start_new_session=True, preexec_fn=setup, env=passthrough.preload_env())
        os.close(w)
        if args.password is not None and self.proc.stdin is not None:
            self.proc.stdin.write(args.password.encode())
            self.proc.stdin.close()
        with os.fdopen(r, "rb") as pipe:
            answer = pipe.readline().decode().strip()
            while answer.startswith("warning: "):
                print(f"imagefs: {answer}", file=sys.stderr)
                answer = pipe.readline().decode().strip()
        if answer != "ok":
            self.stop()
            raise RunError(answer[len("error: "):] if answer.startswith("error: ") else
                           f"the mount process exited ({self.proc.returncode}) before the mount was ready: "
                           f"{self._last_log_line()}")

    def _last_log_line(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    def config(self) -> dict:
        """The selected platform's image config, read through the mount (``rootfs`` names the manifest)."""
        manifest_dir = self.mnt / os.readlink(self.mnt / "rootfs")
        manifest = json.loads((manifest_dir.parent / "blob").read_bytes())
        digest = manifest["config"]["digest"]
        return json.loads((self.mnt / "blobs" / digest.replace(":", "/")).read_bytes())

    def stop(self) -> None:
        """SIGTERM (the mount unmounts and exits), then wait; kill and detach only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(UNMOUNT_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        while os.path.ismount(self.mnt) and time.monotonic() < deadline:
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
            time.sleep(0.05)


def _mount_flags(args) -> list[str]:
    """The mount and registry flags of ``run`` as ``imagefs mount`` takes them."""
    flags = []
    for name in ("platform", "ca_file", "cert_dir", "username", "timeout", "hosts_dir"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    flags += [f for m in args.mirror for f in ("--mirror", m)]
    for name in ("strict", "no_remote_index", "prefetch", "no_passthrough", "plain_http", "insecure", "password_stdin", "debug"):
        if getattr(args, name):
            flags.append(f"--{name.replace('_', '-')}")
    return flags
