"""Raw tar members for layer tests: what ``imagefs.testing.images.tar_layer`` will not write —
devices, xattrs, ``./`` and hostile names, duplicates, GNU long names — in the order given."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

from imagefs.testing import images as im


@dataclass
class M:
    """One member; ``kind`` is a tarfile type constant."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    mode: int = 0o644
    link: str = ""
    uid: int = 0
    gid: int = 0
    major: int = 0
    minor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def dir_(name: str, mode: int = 0o755) -> M:
    return M(name, kind=tarfile.DIRTYPE, mode=mode)


def raw_tar(members: list[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.mode, info.uid, info.gid = m.kind, m.mode, m.uid, m.gid
            info.mtime, info.uname, info.gname = im.EPOCH, "", ""
            info.linkname, info.devmajor, info.devminor = m.link, m.major, m.minor
            info.pax_headers = dict(m.pax)
            info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(m.data) if info.size else None)
    return buf.getvalue()


def layer(members: list[M], compression: im.Compression = "gzip", media: im.Media = "oci", fmt: int = tarfile.PAX_FORMAT) -> im.Blob:
    """A layer blob of exactly these members."""
    return im.Blob(im._LAYER_TYPES[(media, compression)], im.compress(raw_tar(members, fmt), compression))
