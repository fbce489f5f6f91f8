"""The ``imagefs`` command line.

``imagefs mount`` returns once the mount is ready and leaves a background process serving it
(``-f`` stays in the foreground); errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import trio

from .content.local import default_cache_dir
from .descriptors import Platform
from .errors import ImagefsError

log = logging.getLogger("imagefs")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EPILOG = """\
examples:
  imagefs mount docker.io/library/python:3.12 /mnt/py
  imagefs mount 127.0.0.1:5000/demo/imagefs:latest /mnt/demo --all-platforms
  sha256sum /mnt/demo/layer-sha256:*/blob
  getfattr -d -m - /mnt/demo/root
  skopeo inspect oci:/mnt/demo
  imagefs umount /mnt/demo

exit status: 0 success, 1 failure (the message says why), 2 bad usage.
"""


def _platform(text: str) -> Platform:
    try:
        return Platform.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cache_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", type=Path, default=None, metavar="DIR",
        help="content store (default: $IMAGEFS_CACHE_DIR, else $XDG_CACHE_HOME/imagefs, else ~/.cache/imagefs)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagefs",
        description="Mount a container image straight from an OCI registry; bytes are fetched only when read.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    m = sub.add_parser(
        "mount", help="mount an image (returns when the mount is ready)",
        description="Mount REF (a tag or digest, Docker reference grammar: 'alpine' is "
        "docker.io/library/alpine:latest) read-only at MOUNTPOINT. The root manifest and the selected "
        "platform's manifest are fetched now; configs and layers the first time something reads them.",
    )
    m.add_argument("ref", metavar="REF", help="image reference, e.g. alpine, ghcr.io/org/img:tag, name@sha256:…")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="an existing empty directory")
    m.add_argument("--platform", type=_platform, default=None, metavar="OS/ARCH[/VARIANT]",
                   help=f"platform to select from an index (default: this machine's, {Platform.host()})")
    m.add_argument("--all-platforms", action="store_true", help="fetch the manifests of every platform at mount")
    _cache_dir_arg(m)
    m.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground; logs go to stderr")
    m.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS (automatic for localhost/127.0.0.1)")
    m.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification (dangerous)")
    m.add_argument("--ca-file", metavar="FILE", help="trust this CA bundle for the registry's certificate")
    m.add_argument("--debug", action="store_true", help="log every request and FUSE operation")
    m.add_argument("--log-file", type=Path, metavar="FILE",
                   help="where a background mount logs (default: CACHE/logs/<mountpoint>.log)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="unmount an imagefs mount", description="Unmount MOUNTPOINT.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(raw)
    args.argv = raw
    try:
        if args.verb == "mount":
            return cmd_mount(args)
        if args.verb == "umount":
            return cmd_umount(args)
    except ImagefsError as exc:
        print(f"imagefs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _log_file(args) -> Path:
    if args.log_file:
        return args.log_file
    name = hashlib.sha256(str(args.mountpoint.resolve()).encode()).hexdigest()[:12]
    readable = str(args.mountpoint.resolve()).strip("/").replace("/", "_")[-60:] or "root"
    return args.cache_dir / "logs" / f"{readable}-{name}.log"


def _setup_logging(debug: bool, stream=None, path: Path | None = None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("imagefs: %(levelname)s: %(message)s" if not debug else
                                               "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def cmd_mount(args) -> int:
    from .fs.mount import MountOptions, check_mountpoint, serve

    args.cache_dir = (args.cache_dir or default_cache_dir()).resolve()
    check_mountpoint(args.mountpoint)
    if not args.foreground:
        return _spawn_background(args)

    log_path = _log_file(args) if args.ready_fd is not None else None
    _setup_logging(args.debug, path=log_path)
    opts = MountOptions(
        ref=args.ref,
        mountpoint=args.mountpoint.resolve(),
        cache_dir=args.cache_dir,
        platform=args.platform or Platform.host(),
        all_platforms=args.all_platforms,
        plain_http=args.plain_http,
        insecure=args.insecure,
        ca_file=args.ca_file,
        debug=args.debug,
    )
    if args.insecure:
        log.warning("--insecure: the registry's TLS certificate is NOT verified")

    relay = _WarningRelay(args.ready_fd) if args.ready_fd is not None else None
    if relay:
        logging.getLogger().addHandler(relay)

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


def _spawn_background(args) -> int:
    """Start ``mount -f`` detached and wait for its word that the mount is ready (or why not)."""
    log_path = _log_file(args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "imagefs", *args.argv, "--foreground", "--ready-fd", str(w), "--cache-dir", str(args.cache_dir)]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
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
        raise ImagefsError(f"{path} does not exist")
    if not os.path.ismount(path):
        raise ImagefsError(f"{path} is not a mount point")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(path)] if tool else ["umount", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ImagefsError(f"cannot unmount {path}: {done.stderr.strip() or done.stdout.strip()}")
    return EXIT_OK
