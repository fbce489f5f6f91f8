"""The ``imagefs`` argument parser: every verb's flags, declared once, and the flags several verbs share.

Verbs other than mount and umount run ``run(args)`` of their own module, imported only when that verb
runs, so ``imagefs --help`` and a background mount's launcher never load trio, httpx or pyfuse3.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..descriptors import Platform
from ..registry.hosts import default_hosts_dir
from .verbs import read_password, setup_logging


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


def _cache_dir_arg(p: argparse.ArgumentParser) -> argparse.Action:
    return p.add_argument(
        "--cache-dir", type=Path, default=None, metavar="DIR",
        help="content store (default: $IMAGEFS_CACHE_DIR, else $XDG_CACHE_HOME/imagefs, else ~/.cache/imagefs)",
    )


def _registry_args(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags of every verb that talks to a registry (mount, pull, inspect, copy, run)."""
    return [
        p.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS (automatic for localhost/127.0.0.1)"),
        p.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification (dangerous)"),
        p.add_argument("--ca-file", metavar="FILE", help="trust this CA bundle for the registry's certificate"),
        p.add_argument("--cert-dir", metavar="DIR",
                       help="client.cert + client.key (and extra CAs, *.crt) for the registry, as in docker's certs.d/HOST"),
        p.add_argument("--username", metavar="USER",
                       help="log in as USER (password from --password-stdin); default: the credentials "
                       "docker/podman login stored ($REGISTRY_AUTH_FILE, ~/.docker/config.json, credential helpers)"),
        p.add_argument("--password-stdin", action="store_true", help="read the password (or token) for --username from stdin"),
        p.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                       help="give up on a network operation that makes no progress for this long, then retry (default: 30)"),
        p.add_argument("--mirror", action="append", default=[], metavar="URL",
                       help="try this registry mirror (pull and resolve) before the registry; repeatable"),
        p.add_argument("--hosts-dir", type=Path, default=default_hosts_dir(), metavar="DIR",
                       help="containerd-style DIR/<registry>/hosts.toml with mirrors "
                       f"(default: /etc/imagefs/certs.d, else /etc/containerd/certs.d, if present; here: {default_hosts_dir() or 'none'})"),
    ]


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
    _mount_args(m)

    u = sub.add_parser("umount", help="unmount an imagefs mount", description="Unmount MOUNTPOINT.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    u.add_argument("-l", "--lazy", action="store_true",
                   help="detach now even if a program still uses the mount (it goes away when they finish)")
    _cache_verbs(sub)
    _copy_verbs(sub)
    _run_verb(sub)
    return parser


def _mount_args(m: argparse.ArgumentParser) -> list[argparse.Action]:
    """Declare ``imagefs mount``'s arguments on ``m``; return them (:func:`mount_flags` lists them)."""
    added: list[argparse.Action] = []

    def add(*names: str, **how) -> None:
        added.append(m.add_argument(*names, **how))

    add("ref", metavar="REF", help="image reference, e.g. alpine, ghcr.io/org/img:tag, name@sha256:…")
    add("mountpoint", metavar="MOUNTPOINT", type=Path, help="an existing empty directory")
    add("--platform", type=_platform, default=None, metavar="OS/ARCH[/VARIANT]",
        help=f"platform to select from an index (default: this machine's, {Platform.host()})")
    add("--all-platforms", action="store_true", help="fetch the manifests of every platform at mount")
    add("--strict", action="store_true",
        help="serve no byte of a blob before the whole blob is fetched and verified (containerd's rule); "
        "use no remote index")
    add("--no-remote-index", action="store_true",
        help="use no SOCI v1 index found as a referrer of the image (an unbound, mutable reference); "
        "a SOCI-enabled image's own index (v2) is still used")
    add("--prefetch", action="store_true",
        help="after mounting, fetch the selected platform's layers completely in the background")
    add("--index", action="store_true",
        help="index every layer of the selected platform (for rootfs/ and fs/) before the mount returns")
    added.append(_cache_dir_arg(m))
    add("-f", "--foreground", action="store_true", help="serve in the foreground; logs go to stderr")
    added += _registry_args(m)
    add("--no-passthrough", action="store_true",
        help="serve every read through the mount; by default the kernel reads cached, verified blobs "
        "straight from the cache (FUSE passthrough, Linux >= 6.9, as root)")
    add("--debug", action="store_true", help="log every request and FUSE operation")
    add("--log-file", type=Path, metavar="FILE",
        help="where a background mount logs (default: CACHE/logs/<mountpoint>.log)")
    add("--ready-fd", type=int, help=argparse.SUPPRESS)
    add("--span-size", type=int, default=None, help=argparse.SUPPRESS)  # bench/run measures spans
    return added


def mount_flags() -> dict[str, argparse.Action]:
    """``name -> argparse action`` for every ``imagefs mount`` flag with a long name (``--cache-dir`` is
    ``cache_dir``): the mount helper turns ``-o`` options into these flags."""
    flags = {}
    for action in _mount_args(argparse.ArgumentParser(add_help=False)):
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long:
            flags[long[2:].replace("-", "_")] = action
    return flags


def _lazy(module: str, name: str):
    """A verb's ``run(args)``, imported from its own module only when that verb runs."""

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return run


def _size(text: str) -> int:
    from ..units import parse_size

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

    for verb, text in (
        ("pull", "fetch an image's whole graph for the selected platform(s) into the cache"),
        ("inspect", "print an image's descriptor tree (fetches manifests only, never layers)"),
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
        p.set_defaults(run=_lazy(f"imagefs.{verb}", "run"))

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
    """``run`` after the password and logging set-up (read once, before any task starts)."""

    def wrapped(args) -> int:
        args.password = read_password(args)
        setup_logging(args.debug, level=logging.WARNING)
        return run(args)

    return wrapped
