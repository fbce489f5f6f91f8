"""pyfuse3 operations for a mount: the one place where errors become errnos.

Every request handler is wrapped once, by :func:`_fuse_errors`: an :class:`ImagefsError` is logged
and answered with its ``errno``; anything else is logged with its traceback and answered ``EIO``.
Nothing but ``FUSEError`` may leave a handler — any other exception would stop ``pyfuse3.main``
and leave the mount hung.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Mapping

import pyfuse3

from ..descriptors import LAYER_TYPES, has_children
from ..errors import ImagefsError
from ..content.labels import GC_REF, GC_ROOT
from ..reader import BlobReader, Handle
from ..statistics import HasStatistics, collect
from .passthrough import INODE_MASK, Passthrough
from .tree import Node, Tree

log = logging.getLogger(__name__)

# An image never changes under its mount: let the kernel cache names and attributes for long.
TIMEOUT = 24 * 3600.0
XATTR_USER = b"user."


def _fuse_errors(cls):
    """Wrap every request handler the class defines with the errno mapping."""

    def wrap(name, fn):
        @functools.wraps(fn)
        async def handler(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except ImagefsError as exc:
                log.error("%s: %s", name, exc)
                raise pyfuse3.FUSEError(exc.errno) from None
            except Exception:
                log.exception("%s failed", name)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return handler

    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and hasattr(pyfuse3.Operations, name):
            setattr(cls, name, wrap(name, fn))
    return cls


@_fuse_errors
class Operations(pyfuse3.Operations):
    """Answers the kernel from a :class:`Tree`; blobs come through a :class:`BlobReader`."""

    def __init__(self, tree: Tree, reader: BlobReader, passthrough: Passthrough | None = None,
                 parts: Mapping[str, HasStatistics | None] | None = None) -> None:
        """``tree`` brings the image and the :class:`Layers` its views read; ``parts``: what
        ``user.imagefs.statistics`` shows, one key each (:mod:`imagefs.statistics`)."""
        super().__init__()
        self.tree = tree
        self.reader = reader
        self.layers = tree.layers
        self.image = tree.image
        self.mtime_ns = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.handles: dict[int, tuple[Node, Handle | None]] = {}
        self._next_fh = 0
        self.passthrough = passthrough
        self.parts = dict(parts or {})
        self.readdirs = 0  # READDIR requests answered (the kernel answers cached directories itself)

    # -- attributes -----------------------------------------------------------------------------

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        if node.item is not None:  # a file inside a layer: its tar metadata
            entry = node.item.entry
            a.st_uid, a.st_gid, a.st_rdev = entry.uid, entry.gid, entry.rdev
            a.st_size = len(node.target) if node.target else entry.size
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = entry.mtime  # ns, as the tar says
        elif node.data is not None:
            a.st_size = len(node.data)
        elif node.target:
            a.st_size = len(node.target)
        elif node.desc is not None and not node.is_dir:
            a.st_size = node.desc.size
        else:
            a.st_size = 0
        a.st_blksize = 1 << 17
        a.st_blocks = (a.st_size + 511) // 512
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.get(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def getattr(self, inode, ctx=None):
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        await self.tree.expand(parent)
        child = self.tree.child(parent, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(child)

    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if not node.target:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    # -- directories ----------------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self.tree.expand(node)  # looking inside a manifest fetches it
        if node.view is not None and self.passthrough is not None:
            return self.passthrough.cached_dir(inode)  # a listing inside a layer never changes
        return inode

    async def readdir(self, fh, start_id, token):
        node = self._node(fh & INODE_MASK)
        self.readdirs += 1
        # Offsets 1 and 2 follow "." and ".."; entry n (a position in an append-only list) is
        # followed by 3 + n, so offsets survive discovery.
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attr(node), 1):
            return
        if start_id < 2 and not pyfuse3.readdir_reply(token, b"..", self._attr(self.tree.parent(node)), 2):
            return
        start = max(start_id, 2)
        for i, (name, child) in enumerate(self.tree.listing(node, start - 2), start):
            if not pyfuse3.readdir_reply(token, name, self._attr(child), i + 1):
                return

    async def releasedir(self, fh):
        pass

    # -- files ----------------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        self._next_fh += 1
        if node.item is not None:  # layer files are read through verified spans or committed blobs
            # a handle per open file: a plain-tar member read in order gets readahead
            handle = self.layers.open(node.view.layers[node.item.layer], node.item.entry, inode)
            self.handles[self._next_fh] = (node, handle)
            return pyfuse3.FileInfo(fh=self._next_fh, keep_cache=True)
        # Keep the page cache only for verified bytes: an open while a blob streams starts afresh.
        keep = node.data is not None or (node.desc is not None and self.reader.committed(node.desc))
        if node.desc is not None and self.passthrough is not None:
            if keep:  # verified bytes on disk: the kernel can read them itself
                fh = self.passthrough.open(inode, self.reader.store.path(node.desc.digest), self._next_fh)
                if fh is not None:  # (the kernel refuses keep_cache with passthrough: it has no cache of its own)
                    self.handles[fh] = (node, None)
                    return pyfuse3.FileInfo(fh=fh, keep_cache=False)
            self.passthrough.cached_open(inode)
        self.handles[self._next_fh] = (node, self.reader.open(node.desc, inode) if node.desc else None)
        return pyfuse3.FileInfo(fh=self._next_fh, keep_cache=keep)

    async def read(self, fh, off, size):
        try:
            node, handle = self.handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        if node.data is not None:
            return node.data[off : off + size]
        if node.item is not None:
            desc = node.view.layers[node.item.layer]
            return await self.layers.read(desc, node.item.entry, off, size, handle)
        desc = node.desc
        if self.reader.committed(desc):
            return self.reader.read_committed(desc, off, size)
        if desc.media_type in LAYER_TYPES:
            return await self.reader.read(desc, off, size, handle)
        # Manifests, configs and artifacts are served only whole and verified.
        if has_children(desc):
            await self.image.expand(desc)
        else:
            await self.image.ensure(desc)
        return self.reader.read_committed(desc, off, size)

    async def release(self, fh):
        node, _ = self.handles.pop(fh, (None, None))
        if node is not None and node.desc is not None and self.passthrough is not None and not Passthrough.is_passthrough(fh):
            self.passthrough.cached_release(node.inode)

    # -- extended attributes --------------------------------------------------------------------

    async def _xattrs(self, node: Node, *, children: bool = True) -> dict[bytes, bytes]:
        """The ``user.`` attributes of DESIGN.md §2; gc ref labels only when ``children`` (that fetches)."""
        desc = node.desc
        if desc is None:
            if node.inode == pyfuse3.ROOT_INODE:  # what this mount has done, for benchmarks and curious users
                stats = asdict(self.reader.statistics())  # the reader's keys at the top, as before the parts
                stats["passthrough_opens"] = self.passthrough.opens if self.passthrough else 0
                stats["readdirs"] = self.readdirs
                stats.update(collect(self.parts))
                return {XATTR_USER + b"imagefs.statistics": json.dumps(stats).encode()}
            return {}
        out: dict[str, str] = {}
        if desc.digest == self.image.root.digest:
            stamp = self.image.store.labels(desc.digest).get(GC_ROOT)
            if stamp:
                out[GC_ROOT] = stamp
        if children and has_children(desc):
            for i, kid in enumerate(await self.image.expand(desc)):
                out[f"{GC_REF}{i}"] = kid.digest
        out["imagefs.mediatype"] = desc.media_type
        out["imagefs.digest"] = desc.digest
        out["imagefs.size"] = str(desc.size)
        platform = self.image.platforms.get(desc.ref_key)
        if platform is not None:
            out["imagefs.platform"] = str(platform)
        out["imagefs.fetched"] = str(self.reader.fetched(desc))
        return {XATTR_USER + k.encode(): v.encode() for k, v in out.items()}

    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        if node.view is not None:  # inside fs/ and rootfs/: the tar's PAX xattrs and nothing else
            return [k.encode("utf-8", "surrogateescape") for k in (node.item.entry.xattrs if node.item else {})]
        return list(await self._xattrs(node))

    async def getxattr(self, inode, name, ctx):
        node = self._node(inode)
        if node.view is not None:
            value = (node.item.entry.xattrs if node.item else {}).get(name.decode("utf-8", "surrogateescape"))
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR if name.startswith(XATTR_USER) else errno.EOPNOTSUPP)
            return value
        # ls -l asks every entry for security.selinux and system.posix_acl_access. EOPNOTSUPP (not
        # ENOATTR) is "no such namespace here": coreutils and libacl then stop asking for the rest of
        # the device — one round trip per listing instead of two per entry (measured: ls -l of 20,000
        # entries 8.1 s -> see bench/rootfs). Never ENOSYS: the kernel would drop getxattr for
        # the whole mount, user.* included.
        if not name.startswith(XATTR_USER):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        wants_children = name.startswith(XATTR_USER + GC_REF.encode())
        value = (await self._xattrs(node, children=wants_children)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    # -- the filesystem -------------------------------------------------------------------------

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(d.size for d in self.image.descriptors.values())
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def access(self, inode, mode, ctx):
        self._node(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
