"""Test images made of this machine's own programs: real binaries, with the libraries ``ldd`` names.

Why: ``imagefs run`` must start real programs, and the registries the tests use have no network
to pull a distribution from. The host's ``/bin/sh``, ``bash`` and coreutils, with their shared
libraries and the dynamic loader, are a minimal root filesystem that runs here by construction.
Debian's merged /usr is kept: ``bin``, ``lib``, ``lib64`` and ``sbin`` are symlinks into ``usr/``.

    layer = host_layer(["sh", "bash", "cat"], extra={"etc/motd": b"hi\\n"})
    img = im.image([layer], config_extra=run_config(cmd=["cat", "/etc/motd"]))
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from imagefs.testing import images as im

#: Programs most tests need: a shell, bash, and the coreutils they call.
BASIC = ("sh", "bash", "cat", "echo", "env", "id", "ls", "sleep", "touch", "mkdir", "rm", "head", "stat", "readlink")
MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
_LDD_PATH = re.compile(r"(/\S+) \(0x[0-9a-f]+\)$")


def _link_chain(path: str) -> Iterable[str]:
    """``path`` and every symlink met on the way to its file, each as an absolute path."""
    seen = set()
    while os.path.islink(path) and path not in seen:
        seen.add(path)
        yield path
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    yield path


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    return [m.group(1) for line in out.splitlines() if (m := _LDD_PATH.search(line.strip()))]


def in_image(path: str) -> str:
    """A host path as the merged-/usr image stores it (``/lib/x`` -> ``usr/lib/x``)."""
    rel = path.lstrip("/")
    top, _, rest = rel.partition("/")
    return f"{MERGED[top]}/{rest}" if top in MERGED and rest else rel


def host_files(programs: Iterable[str]) -> dict[str, bytes | im.FileEntry]:
    """Layer entries for ``programs`` (names on PATH or absolute paths) and everything they load."""
    files: dict[str, bytes | im.FileEntry] = {link: im.FileEntry.symlink(target) for link, target in MERGED.items()}
    wanted: list[str] = []
    for name in programs:
        found = name if name.startswith("/") else shutil.which(name)
        if found is None:
            raise FileNotFoundError(f"{name} is not on this machine's PATH")
        wanted += [found, *_libraries(os.path.realpath(found))]
    for path in wanted:
        for step in _link_chain(path):
            key = in_image(step)
            if key in files:
                continue
            if os.path.islink(step):
                files[key] = im.FileEntry.symlink(os.readlink(step))
            else:
                files[key] = im.FileEntry.file(Path(step).read_bytes(), mode=os.stat(step).st_mode & 0o7777)
    return files


def host_layer(programs: Iterable[str] = BASIC, extra: Mapping[str, bytes | im.FileEntry] | None = None) -> im.Blob:
    """A gzip layer of ``programs``, their libraries, the usual empty top directories, and ``extra``."""
    files = host_files(programs)
    for top in ("etc", "proc", "dev", "tmp", "root", "var/tmp"):
        files.setdefault(top, im.FileEntry.dir(0o1777 if top.endswith("tmp") else 0o755))
    files.setdefault("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
                                   b"app:x:1000:1000:app:/home/app:/bin/sh\n")
    files.setdefault("etc/group", b"root:x:0:\nnogroup:x:65534:\napp:x:1000:\n")
    files.update(extra or {})
    return im.tar_layer(files)


def run_config(*, entrypoint: list[str] | None = None, cmd: list[str] | None = None, env: list[str] | None = None,
               workdir: str | None = None, user: str | None = None) -> dict:
    """``config_extra`` for :func:`imagefs.testing.images.image`: the ``config`` object ``imagefs run`` reads."""
    config: dict = {"Env": env if env is not None else ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    for key, value in (("Entrypoint", entrypoint), ("Cmd", cmd), ("WorkingDir", workdir), ("User", user)):
        if value is not None:
            config[key] = value
    return {"config": config}


def write_tree_layer(roots: Iterable[str], out: Path, *, exclude: Iterable[str] = ()) -> int:
    """A plain tar of host directory trees at ``out`` (symlinks kept, sockets skipped), streamed, for
    images too big to build in memory; returns the bytes written. Unreadable files are left out."""
    skip = tuple(exclude)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.name.startswith(skip) or not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
            return None
        info.mtime, info.uname, info.gname = im.EPOCH, "", ""
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for link, target in MERGED.items():
            info = tarfile.TarInfo(link)
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, im.EPOCH
            tar.addfile(info)
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in [""] + sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
                    path = os.path.join(dirpath, name) if name else dirpath
                    try:
                        tar.add(path, arcname=in_image(path), recursive=False, filter=keep)
                    except OSError:
                        pass
    return out.stat().st_size
