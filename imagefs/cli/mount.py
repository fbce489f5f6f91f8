"""``imagefs mount`` and ``imagefs umount``.

``mount`` returns once the mount is ready and leaves a background process serving it: it starts
``mount -f --ready-fd N`` detached (:func:`_spawn_background`), which serves in trio and writes ``ok``,
``error: …`` or early warnings to that pipe. The launcher imports neither trio nor pyfuse3.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..descriptors import Platform
from ..errors import ImagefsError, MountError
from .parser import registry_options
from .verbs import EXIT_ERROR, EXIT_OK, read_password, setup_logging

log = logging.getLogger("imagefs")


def _log_file(args) -> Path:
    if args.log_file:
        return args.log_file
    name = hashlib.sha256(str(args.mountpoint.resolve()).encode()).hexdigest()[:12]
    readable = str(args.mountpoint.resolve()).strip("/").replace("/", "_")[-60:] or "root"
    from ..content import layout

    return layout.logs(args.cache_dir) / f"{readable}-{name}.log"


def cmd_mount(args) -> int:
    from ..content.layout import default_cache_dir
    from ..fs import passthrough
    from ..fs.mountpoint import check_mountpoint

    args.cache_dir = (args.cache_dir or default_cache_dir()).resolve()
    if args.no_passthrough:
        os.environ[passthrough.ENV] = "0"
    if args.foreground:  # the passthrough shim must be loaded before libfuse: start again with it
        passthrough.reexec_preloaded(args.argv)
        passthrough.forget_preload()
    password = read_password(args)
    check_mountpoint(args.mountpoint)
    if not args.foreground:
        return _spawn_background(args, password)

    import trio

    from ..fs.mount import MountOptions, serve
    from ..registry.connect import RegistryOptions

    log_path = _log_file(args) if args.ready_fd is not None else None
    setup_logging(args.debug, path=log_path)
    opts = MountOptions(
        ref=args.ref,
        mountpoint=args.mountpoint.resolve(),
        cache_dir=args.cache_dir,
        platform=args.platform or Platform.host(),
        all_platforms=args.all_platforms,
        strict=args.strict,
        remote_index=not args.no_remote_index,
        prefetch=args.prefetch,
        index=args.index,
        span=args.span_size,
        debug=args.debug,
        passthrough=not args.no_passthrough,
        registry=RegistryOptions(**registry_options(args, password)),
    )

    relay = _WarningRelay(args.ready_fd) if args.ready_fd is not None else None
    if relay:
        logging.getLogger().addHandler(relay)
    if args.insecure:  # after the relay, so the user's terminal shows it too
        log.warning("--insecure: the registry's TLS certificate is NOT verified")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, opts)
            if relay:
                logging.getLogger().removeHandler(relay)
            _report_ready(args.ready_fd, "ok")

    try:
        trio.run(run)
    except ImagefsError as exc:
        log.debug("mount failed", exc_info=True)
        _report_ready(args.ready_fd, f"error: {exc}")
        if args.ready_fd is None:
            print(f"imagefs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


class _WarningRelay(logging.Handler):
    """Until the mount is ready, warnings also go up the pipe, so the user's terminal shows them."""

    def __init__(self, fd: int) -> None:
        super().__init__(logging.WARNING)
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, f"warning: {record.getMessage()}".replace("\n", " ").encode() + b"\n")
        except OSError:
            pass


def _report_ready(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def _spawn_background(args, password: str | None = None) -> int:
    """Start ``mount -f`` detached and wait for its word that the mount is ready (or why not).

    A ``--password-stdin`` password goes to the child over its stdin, as it came to us: never on
    a command line or in the environment, where ``ps`` and ``/proc`` would show it.
    """
    from ..fs import passthrough

    log_path = _log_file(args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "imagefs", *args.argv, "--foreground", "--ready-fd", str(w), "--cache-dir", str(args.cache_dir)]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL if password is None else subprocess.PIPE,
                                stdout=logf, stderr=logf, start_new_session=True, env=passthrough.preload_env())
    if password is not None and proc.stdin is not None:
        proc.stdin.write(password.encode())
        proc.stdin.close()
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.readline().decode().strip()
        while answer.startswith("warning: "):
            print(f"imagefs: {answer}", file=sys.stderr)
            answer = pipe.readline().decode().strip()
    if answer == "ok":
        return EXIT_OK
    if answer.startswith("error: "):
        print(f"imagefs: {answer[len('error: '):]}", file=sys.stderr)
    else:
        code = proc.wait()
        print(f"imagefs: the mount process exited ({code}) before the mount was ready; see {log_path}", file=sys.stderr)
    proc.wait()
    return EXIT_ERROR


def cmd_umount(args) -> int:
    path = args.mountpoint
    if not path.exists():
        raise MountError(f"{path} does not exist")
    if not os.path.ismount(path):
        raise MountError(f"{path} is not a mount point")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-uz" if args.lazy else "-u", str(path)]
    else:
        cmd = ["umount", *(["-l"] if args.lazy else []), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        why = done.stderr.strip() or done.stdout.strip()
        hint = " (a program still uses it: imagefs umount --lazy detaches it now)" if "busy" in why else ""
        raise MountError(f"cannot unmount {path}: {why}{hint}")
    return EXIT_OK
