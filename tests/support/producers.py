"""Layers made by the real producers, not by our own test helpers.

- eStargz and zstd:chunked from stargz-snapshotter's own library (``producers/main.go``, built once
  per machine in GOPATH mode from Debian's golang-github-containerd-stargz-snapshotter-dev);
- zstd:chunked from skopeo's ``--dest-compress-format zstd:chunked`` (containers/storage's compressor).

``tree_tar()`` is the content they all get: a few hundred files, some of several chunks with varied
content, symlinks, a hard link, setuid and sticky bits.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import tempfile
from pathlib import Path

from imagefs.testing import images as im

SOURCE = Path(__file__).with_name("producers") / "main.go"
CHUNK = 256 << 10  # bytes per chunk the library writes: small, so the files below have many


def tool() -> Path:
    """The built producer, keyed by its source's hash (a rebuild costs ~2 s, a reuse nothing)."""
    key = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"imagefs-producers-{key}"
    binary = out / "producers"
    if not binary.exists():
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(out / "gocache"),
               "GOFLAGS": ""}
        tmp = out / f"producers.{os.getpid()}.tmp"
        subprocess.run(["go", "build", "-o", str(tmp), str(SOURCE)], check=True, capture_output=True, env=env, timeout=300)
        os.replace(tmp, binary)
    return binary


def tree_tar(seed: int = 14) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind=tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, **kw) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.mtime = kind, mode, len(data), 1_700_000_000 + len(name)
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("usr", tarfile.DIRTYPE, mode=0o755)
        add("usr/bin", tarfile.DIRTYPE, mode=0o755)
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        for d in range(12):
            add(f"usr/share/d{d}", tarfile.DIRTYPE, mode=0o755)
            for f in range(25):
                text = f"file {d}/{f}\n".encode() * rng.randint(1, 400)
                add(f"usr/share/d{d}/f{f}.txt", data=text, uid=d, gid=f)
        # multi-chunk files: random (incompressible), text-like, and mixed with long zero runs
        add("usr/bin/big-random", data=rng.randbytes(1_300_000), mode=0o4755)
        add("usr/bin/big-text", data=b"".join(f"line {i} {rng.random()}\n".encode() for i in range(60_000)), mode=0o755)
        add("usr/lib-mixed", data=rng.randbytes(300_000) + bytes(700_000) + rng.randbytes(400_000))
        add("usr/bin/alias", tarfile.SYMTYPE, linkname="big-text", mode=0o777)
        add("usr/bin/hard", tarfile.LNKTYPE, linkname="usr/bin/big-random", mode=0o4755)
        add("usr/empty", data=b"")
    return buf.getvalue()


def library_layer(tar: bytes, fmt: str) -> tuple[im.Blob, str]:
    """(the layer ``fmt`` — ``estargz`` or ``zstdchunked`` — as the library writes it, its diff_id)."""
    with tempfile.TemporaryDirectory(prefix="imagefs-producer-") as tmp:
        src, out = Path(tmp, "in.tar"), Path(tmp, "out")
        src.write_bytes(tar)
        done = subprocess.run([str(tool()), "-format", fmt, "-chunk-size", str(CHUNK), str(src), str(out)],
                              check=True, capture_output=True, text=True, timeout=120)
        annotations = json.loads(done.stdout)
        diff_id = annotations.pop("diffID")
        media = im.OCI_LAYER_GZIP if fmt == "estargz" else im.OCI_LAYER_ZSTD
        return im.Blob(media, out.read_bytes(), annotations=tuple(sorted(annotations.items()))), diff_id


def skopeo_zstd_chunked(host: str, src_repo: str, dest_repo: str) -> None:
    """Copy ``src_repo:v1`` to ``dest_repo:v1`` on one registry, recompressed by skopeo as zstd:chunked."""
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
                    "--dest-compress-format", "zstd:chunked", f"docker://{host}/{src_repo}:v1",
                    f"docker://{host}/{dest_repo}:v1"], check=True, capture_output=True, timeout=120)
