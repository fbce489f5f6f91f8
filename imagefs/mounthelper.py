"""``mount -t fuse.imagefs REF MOUNTPOINT -o OPTIONS`` and ``/etc/fstab`` lines, as sshfs offers.

How util-linux dispatches a ``fuse.TYPE`` mount: libmount looks for a helper named
``mount.fuse.TYPE`` in ``/sbin`` (``/sbin/fs.d``, ``/sbin/fs``) and runs it as::

    /sbin/mount.fuse.imagefs SOURCE MOUNTPOINT [-s] [-f] [-n] [-v] -o OPTIONS [-t fuse.imagefs]

Only without such a helper does it fall back to ``mount.fuse3``, which would run a program named
``imagefs`` with ``SOURCE MOUNTPOINT -o OPTIONS`` — not our command line. So ``mount.sh`` installs
``/sbin/mount.fuse.imagefs`` (``python3 -m imagefs.mounthelper --install``), a two-line script that
runs this module, which turns the options into ``imagefs mount`` flags and mounts. ``mount`` returns
when the mount is ready, like ``imagefs mount``; ``umount MOUNTPOINT`` ends it.

Options: every flag of ``imagefs mount`` that makes sense without a terminal, spelled with
underscores or dashes — ``cache_dir=DIR``, ``platform=linux/arm64``, ``all_platforms``,
``plain_http``, ``insecure``, ``ca_file=FILE``, ``log_file=FILE``, ``debug`` (and ``timeout=``,
``mirror=``, ``cert_dir=``… where ``imagefs mount`` has them). Generic options (``ro``, ``rw``,
``defaults``, ``noauto``, ``_netdev``, ``user``, ``nofail``, ``allow_other``, ``x-systemd.*``…) are
accepted and ignored: an imagefs mount is always read-only, and ``allow_other`` is set for root.
An unknown option is an error, unless ``-s`` (sloppy) is given. Examples::

    mount -t fuse.imagefs 127.0.0.1:5000/demo/imagefs:latest /mnt/demo -o cache_dir=/var/cache/imagefs
    # /etc/fstab
    registry.example.com/app:1.4  /mnt/app  fuse.imagefs  ro,_netdev,platform=linux/amd64  0  0

Exit status as mount(8) expects of a helper: 0 mounted, 1 bad usage, 32 the mount failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

HELPER_PATH = Path("/sbin/mount.fuse.imagefs")
EXIT_OK, EXIT_USAGE, EXIT_FAILURE = 0, 1, 32

# Generic mount(8) and FUSE options that mean nothing to imagefs (or that it always applies).
IGNORED = frozenset({
    "ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail",
    "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime", "norelatime",
    "strictatime", "nostrictatime", "diratime", "nodiratime", "lazytime", "nolazytime", "sync", "async",
    "dirsync", "silent", "loud", "allow_other", "allow_root", "default_permissions", "auto_unmount",
})
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=", "context=", "fscontext=", "defcontext=", "rootcontext=")
# Flags of `imagefs mount` a mount helper must not pass on.
NOT_OPTIONS = frozenset({"help", "foreground", "ready_fd", "password_stdin", "ref", "mountpoint"})


class UsageError(Exception):
    pass


def _mount_flags() -> dict[str, argparse.Action]:
    """``option name -> argparse action`` for every ``imagefs mount`` flag (one source of truth)."""
    from .cli.parser import mount_flags

    return {name: action for name, action in mount_flags().items() if action.dest not in NOT_OPTIONS}


def translate(options: list[str], *, sloppy: bool = False) -> tuple[list[str], list[str]]:
    """``-o`` options to ``imagefs mount`` flags; also returns the options ignored."""
    flags = _mount_flags()
    argv: list[str] = []
    ignored: list[str] = []
    for opt in options:
        if not opt:
            continue
        name, has_value, value = opt.partition("=")
        key = name.replace("-", "_")
        if opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            ignored.append(opt)
            continue
        action = flags.get(key)
        if action is None:
            if sloppy:
                ignored.append(opt)
                continue
            known = ", ".join(sorted(flags))
            raise UsageError(f"unknown mount option {opt!r} (imagefs takes: {known}; generic ones are ignored)")
        flag = next(o for o in action.option_strings if o.startswith("--"))
        takes_value = action.nargs != 0
        if takes_value and not has_value:
            raise UsageError(f"mount option {name} needs a value: {name}=…")
        if not takes_value and has_value:
            raise UsageError(f"mount option {name} takes no value")
        argv += [flag, value] if takes_value else [flag]
    return argv, ignored


def parse_helper_argv(argv: list[str]) -> tuple[str, str, list[str], dict[str, bool]]:
    """``SOURCE MOUNTPOINT [-sfnv] [-o OPTS]… [-t TYPE]`` as libmount passes them."""
    positional: list[str] = []
    options: list[str] = []
    switches = {"sloppy": False, "fake": False, "verbose": False}
    it = iter(argv)
    for arg in it:
        if arg == "-o" or arg == "-t":
            value = next(it, None)
            if value is None:
                raise UsageError(f"{arg} needs a value")
            if arg == "-o":
                options += value.split(",")
        elif arg.startswith("-o") and len(arg) > 2:
            options += arg[2:].split(",")
        elif arg.startswith("-t") and len(arg) > 2:
            pass
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnvr"):
            switches["sloppy"] |= "s" in arg
            switches["fake"] |= "f" in arg
            switches["verbose"] |= "v" in arg
            if "r" in arg:
                options.append("ro")
        elif arg.startswith("-"):
            raise UsageError(f"unknown switch {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("usage: mount.fuse.imagefs REF MOUNTPOINT [-o OPTIONS]")
    source, mountpoint = positional
    if source.startswith("imagefs#"):  # the old mount.fuse "TYPE#SOURCE" spelling
        source = source[len("imagefs#"):]
    return source, mountpoint, options, switches


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return EXIT_OK
    if argv[:1] == ["--install"]:
        return install(Path(argv[1]) if len(argv) > 1 else HELPER_PATH)
    try:
        source, mountpoint, options, sw = parse_helper_argv(argv)
        flags, ignored = translate(options, sloppy=sw["sloppy"])
    except UsageError as exc:
        print(f"mount.fuse.imagefs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = ["mount", source, mountpoint, *flags]
    if sw["verbose"]:
        print(f"mount.fuse.imagefs: imagefs {shlex.join(command)}"
              + (f" (ignoring {','.join(ignored)})" if ignored else ""), file=sys.stderr)
    if sw["fake"]:
        return EXIT_OK
    from .cli import main as imagefs

    try:
        code = imagefs(command)
    except SystemExit as exc:  # argparse refused a value, e.g. platform=nonsense
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return {0: EXIT_OK, 2: EXIT_USAGE}.get(code, EXIT_FAILURE)


def script(python: str) -> str:
    return (
        "#!/bin/sh\n"
        "# mount -t fuse.imagefs REF MOUNTPOINT -o OPTIONS, and /etc/fstab lines of type fuse.imagefs.\n"
        "# Installed by imagefs (mount.sh: python3 -m imagefs.mounthelper --install); options: --help.\n"
        f"exec {shlex.quote(python)} -m imagefs.mounthelper \"$@\"\n"
    )


def install(path: Path = HELPER_PATH, python: str | None = None) -> int:
    """Write the helper script where mount(8) finds it; silent when it is there already."""
    text = script(python or sys.executable)
    try:
        if path.read_text() == text and os.access(path, os.X_OK):
            return EXIT_OK
    except OSError:
        pass
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"mount.fuse.imagefs: cannot install {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"installed {path} (mount -t fuse.imagefs, fstab type fuse.imagefs)", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
