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
import signal
import subprocess
import sys
from pathlib import Path

from .descriptors import Platform
from .errors import ConfigError, ImagefsError, MountError
from .registry.hosts import default_hosts_dir

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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _cache_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", type=Path, default=None, metavar="DIR",
        help="content store (default: $IMAGEFS_CACHE_DIR, else $XDG_CACHE_HOME/imagefs, else ~/.cache/imagefs)",
    )


def _registry_args(p: argparse.ArgumentParser) -> None:
    """The flags of every verb that talks to a registry (mount, pull, inspect)."""
    p.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS (automatic for localhost/127.0.0.1)")
    p.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification (dangerous)")
    p.add_argument("--ca-file", metavar="FILE", help="trust this CA bundle for the registry's certificate")
    p.add_argument("--cert-dir", metavar="DIR",
                   help="client.cert + client.key (and extra CAs, *.crt) for the registry, as in docker's certs.d/HOST")
    p.add_argument("--username", metavar="USER",
                   help="log in as USER (password from --password-stdin); default: the credentials "
                   "docker/podman login stored ($REGISTRY_AUTH_FILE, ~/.docker/config.json, credential helpers)")
    p.add_argument("--password-stdin", action="store_true", help="read the password (or token) for --username from stdin")
    p.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="give up on a network operation that makes no progress for this long, then retry (default: 30)")
    p.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="try this registry mirror (pull and resolve) before the registry; repeatable")
    p.add_argument("--hosts-dir", type=Path, default=default_hosts_dir(), metavar="DIR",
                   help="containerd-style DIR/<registry>/hosts.toml with mirrors "
                   f"(default: /etc/imagefs/certs.d, else /etc/containerd/certs.d, if present; here: {default_hosts_dir() or 'none'})")


def registry_options(args, password: str | None) -> dict:
    """:class:`~imagefs.registry.connect.RegistryOptions` fields from :func:`_registry_args`'s flags,
    as keywords (``copy`` passes them to ``registry_client`` / ``pusher`` as they are)."""
    return dict(
        plain_http=args.plain_http,
        insecure=args.insecure,
        ca_file=args.ca_file,
        cert_dir=args.cert_dir,
        username=args.username,
        password=password,
        timeout=args.timeout,
        mirrors=tuple(args.mirror),
        hosts_dir=args.hosts_dir,
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
    m.add_argument("--strict", action="store_true",
                   help="serve no byte of a blob before the whole blob is fetched and verified (containerd's rule); "
                   "use no remote index")
    m.add_argument("--no-remote-index", action="store_true",
                   help="use no SOCI v1 index found as a referrer of the image (an unbound, mutable reference); "
                   "a SOCI-enabled image's own index (v2) is still used")
    m.add_argument("--prefetch", action="store_true",
                   help="after mounting, fetch the selected platform's layers completely in the background")
    m.add_argument("--index", action="store_true",
                   help="index every layer of the selected platform (for rootfs/ and fs/) before the mount returns")
    _cache_dir_arg(m)
    m.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground; logs go to stderr")
    _registry_args(m)
    m.add_argument("--no-passthrough", action="store_true",
                   help="serve every read through the mount; by default the kernel reads cached, verified blobs "
                   "straight from the cache (FUSE passthrough, Linux >= 6.9, as root)")
    m.add_argument("--debug", action="store_true", help="log every request and FUSE operation")
    m.add_argument("--log-file", type=Path, metavar="FILE",
                   help="where a background mount logs (default: CACHE/logs/<mountpoint>.log)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--span-size", type=int, default=None, help=argparse.SUPPRESS)  # bench/run measures spans

    u = sub.add_parser("umount", help="unmount an imagefs mount", description="Unmount MOUNTPOINT.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    u.add_argument("-l", "--lazy", action="store_true",
                   help="detach now even if a program still uses the mount (it goes away when they finish)")
    _cache_verbs(sub)
    _copy_verbs(sub)
    _run_verb(sub)
    return parser


def _lazy(module: str, name: str):
    """A verb's ``run(args)``, imported from its own module only when that verb runs."""

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def _size(text: str) -> int:
    from .units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cache_verbs(sub) -> None:
    """gc, fsck, pull, inspect and ls: the cache's life cycle; their code lives in their own modules."""
    g = sub.add_parser("gc", help="remove what no image or live mount references",
                       description="Mark from every gc.root image and every live mount, sweep the rest and "
                       "abandoned ingests; print what was removed and the space freed.")
    g.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    g.add_argument("--max-size", type=_size, metavar="SIZE",
                   help="then evict least recently used layers of images no mount uses until the cache fits "
                   "(bytes, 500M, 2G, 1.5GiB; K/M/G are 1024-based, KB/MB/GB 1000-based)")
    _cache_dir_arg(g)
    g.set_defaults(run=_lazy("imagefs.gc", "run"))

    f = sub.add_parser("fsck", help="re-hash every cached blob and check labels (exit 1 if anything is wrong)",
                       description="Check the content store. Exit status: 0 clean, 1 problems found, 2 usage.")
    f.add_argument("--repair", action="store_true", help="remove what is wrong (a mount fetches it again when needed)")
    _cache_dir_arg(f)
    f.set_defaults(run=_lazy("imagefs.fsck", "run"))

    for verb, fn, text in (
        ("pull", "run_pull", "fetch an image's whole graph for the selected platform(s) into the cache"),
        ("inspect", "run_inspect", "print an image's descriptor tree (fetches manifests only, never layers)"),
    ):
        p = sub.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("ref", metavar="REF", help="image reference, e.g. alpine, ghcr.io/org/img:tag, name@sha256:…")
        p.add_argument("--platform", type=_platform, default=None, metavar="OS/ARCH[/VARIANT]",
                       help=f"platform to select from an index (default: this machine's, {Platform.host()})")
        p.add_argument("--all-platforms", action="store_true", help="every platform of an index")
        _registry_args(p)
        p.add_argument("--debug", action="store_true", help="log every request")
        if verb == "inspect":
            p.add_argument("--json", action="store_true", help="the tree as JSON")
        _cache_dir_arg(p)
        p.set_defaults(run=_lazy("imagefs.pull", fn))

    s = sub.add_parser("ls", aliases=["status"], help="what the cache holds: images, sizes, live mounts")
    s.add_argument("--json", action="store_true", help="as JSON")
    _cache_dir_arg(s)
    s.set_defaults(run=_lazy("imagefs.status", "run"))


def _copy_verbs(sub) -> None:
    """copy and rm: an image out of the cache or a registry, and an image forgotten."""
    c = sub.add_parser("copy", help="copy an image (every platform, digests kept) to a registry or an OCI layout",
                       description="Copy SRC (a registry reference: tag or digest) to DEST (a registry reference, "
                       "or oci:DIR[:TAG]) byte for byte, so every digest stays. Blobs the cache holds come from "
                       "it (SRC may be down); the rest stream from SRC, verified, and are kept in the cache. "
                       "Blobs DEST has are skipped; on the same registry they are mounted from SRC's repository. "
                       "The tag is written last; the digest written is printed last. --username and "
                       "--password-stdin serve both registries.")
    c.add_argument("src", metavar="SRC", help="image reference, e.g. 127.0.0.1:5000/app:v1, ghcr.io/org/img@sha256:…")
    c.add_argument("dest", metavar="DEST", help="registry reference, or oci:DIR[:TAG] (TAG defaults to latest)")
    c.add_argument("--platform", type=_platform, default=None, metavar="OS/ARCH[/VARIANT]",
                   help="copy only this platform's manifest (DEST names it); default: the whole index")
    c.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    c.add_argument("--soci", action="store_true",
                   help="write a SOCI-enabled image (SOCI index manifest v2, as `soci convert`): a zTOC per gzip "
                   "layer, a SOCI index per platform, the image manifests annotated with it, and an image index "
                   "holding both; DEST then names that new index (its digest is printed), so digests change")
    c.add_argument("--soci-span-size", type=_size, default=None, metavar="SIZE",
                   help="compressed bytes of a span holding small files (default 512K; 4M among bigger files, 16M "
                   "inside one file; doubled while the zTOC would pass 3%% of the layer): smaller spans make a small "
                   "read cheaper and the zTOC bigger (32 KiB a checkpoint)")
    c.add_argument("--soci-min-layer-size", type=_size, default=None, metavar="SIZE",
                   help="layers smaller than this get no zTOC and are indexed locally on first contact (default 10M, soci's)")
    _registry_args(c)
    c.add_argument("--debug", action="store_true", help="log every request")
    _cache_dir_arg(c)
    c.set_defaults(run=_registry_verb(_lazy("imagefs.copy", "run")))

    r = sub.add_parser("rm", help="forget images: their gc root and remembered tag (imagefs gc then frees them)",
                       description="Forget each REF: its gc root label and remembered tag go, so the next "
                       "`imagefs gc` sweeps what no other image references. A live mount keeps its image until unmounted.")
    r.add_argument("refs", metavar="REF", nargs="+", help="image reference (tag or digest), as it was mounted or pulled")
    _cache_dir_arg(r)
    r.set_defaults(run=_lazy("imagefs.rm", "run"))


def _run_verb(sub) -> None:
    """run: an image's program in its rootfs, under bubblewrap, on a private mount."""
    r = sub.add_parser("run", help="run an image's Entrypoint + Cmd (or CMD) in its rootfs, fetching only what it reads",
                       description="Mount REF privately, run its Entrypoint + Cmd (CMD after -- replaces Cmd) in rootfs/ "
                       "under bubblewrap with the config's Env, WorkingDir and User, /proc, a minimal /dev, a tmpfs /tmp and "
                       "this machine's /etc/resolv.conf and /etc/hosts; unmount when it ends. The image is read-only unless "
                       "--writable. Signals reach the program; the exit status is its own, or 128+N for signal N.")
    r.add_argument("ref", metavar="REF", help="image reference, e.g. debian, ghcr.io/org/img:tag, name@sha256:…")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="run this instead of the image's Cmd")
    r.add_argument("--entrypoint", metavar="PROGRAM", help="replace the image's Entrypoint ('' for none); Cmd is dropped too")
    r.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="set an environment variable (NAME alone: its value here); repeatable")
    r.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:PATH[:ro]", help="bind a host path into the sandbox; repeatable")
    r.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside (default: the config's WorkingDir, else /)")
    r.add_argument("--writable", action="store_true", help="a tmpfs overlay above the image: writes anywhere, all gone at exit")
    r.add_argument("--platform", type=_platform, default=None, metavar="OS/ARCH[/VARIANT]",
                   help=f"platform to select from an index (default: this machine's, {Platform.host()})")
    r.add_argument("--strict", action="store_true", help="serve no byte of a blob before the whole blob is verified; "
                   "use no remote index")
    r.add_argument("--no-remote-index", action="store_true", help="use no SOCI v1 index found as a referrer of the image")
    r.add_argument("--prefetch", action="store_true", help="fetch the image's layers completely in the background")
    r.add_argument("--no-passthrough", action="store_true", help="serve every read through the mount (no FUSE passthrough)")
    _registry_args(r)
    r.add_argument("--debug", action="store_true", help="log every request and FUSE operation (to the mount's log)")
    _cache_dir_arg(r)
    r.set_defaults(run=_registry_verb(_lazy("imagefs.run", "run")))


def _registry_verb(run):
    """``run`` after this module's password and logging set-up (read once, before any task starts)."""

    def wrapped(args) -> int:
        args.password = read_password(args)
        setup_logging(args.debug, level=logging.WARNING)
        return run(args)

    return wrapped


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(raw)
    args.argv = raw
    try:
        if args.verb == "mount":
            return cmd_mount(args)
        if args.verb == "umount":
            return cmd_umount(args)
        if hasattr(args, "run"):
            return args.run(args)
    except ImagefsError as exc:
        print(f"imagefs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `imagefs inspect … | head`: the reader has enough; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 128 + signal.SIGPIPE
    return EXIT_USAGE


def _log_file(args) -> Path:
    if args.log_file:
        return args.log_file
    name = hashlib.sha256(str(args.mountpoint.resolve()).encode()).hexdigest()[:12]
    readable = str(args.mountpoint.resolve()).strip("/").replace("/", "_")[-60:] or "root"
    from .content import layout

    return layout.logs(args.cache_dir) / f"{readable}-{name}.log"


def setup_logging(debug: bool, path: Path | None = None, level: int = logging.INFO) -> None:
    """Log to ``path`` (a background mount) or stderr; ``level`` when not ``debug``."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("imagefs: %(levelname)s: %(message)s" if not debug else
                                               "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else level)
    if not debug:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def cmd_mount(args) -> int:
    from .content.local import default_cache_dir
    from .fs import passthrough
    from .fs.mountpoint import check_mountpoint

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

    from .fs.mount import MountOptions, serve
    from .registry.connect import RegistryOptions

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


def read_password(args) -> str | None:
    """The ``--password-stdin`` password, as ``docker login`` reads it (one trailing newline dropped)."""
    if args.username is None and not args.password_stdin:
        return None
    if not (args.username and args.password_stdin):
        raise ConfigError("--username and --password-stdin go together (the password is read from stdin)")
    password = sys.stdin.read()
    password = password[:-1] if password.endswith("\n") else password
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise ConfigError("--password-stdin: no password on stdin")
    return password


def _spawn_background(args, password: str | None = None) -> int:
    """Start ``mount -f`` detached and wait for its word that the mount is ready (or why not).

    A ``--password-stdin`` password goes to the child over its stdin, as it came to us: never on
    a command line or in the environment, where ``ps`` and ``/proc`` would show it.
    """
    from .fs import passthrough

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
