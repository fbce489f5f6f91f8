"""The FUSE ``Operations`` called in-process, with no mount: the errno boundary.

S3QL tiers its tests as units, ``Operations`` in-process, then real mounts; this is the middle
tier. A :class:`Tree` is built as ``serve()`` builds it, over an in-memory registry that can be
told to corrupt or refuse a blob, and the handlers are awaited directly. What is checked is what a
reader of the mount sees: ENOENT for a missing name, EROFS for a write, EIO for a digest mismatch
or a registry failure, ENOATTR for a missing xattr — and that nothing but ``FUSEError`` leaves a
handler (anything else would stop ``pyfuse3.main`` and hang the mount).
"""

from __future__ import annotations

import errno
import inspect
import os
from contextlib import asynccontextmanager

import pyfuse3
import pytest

from imagefs import descriptors as d
from imagefs.content import LocalStore
from imagefs.errors import RegistryError
from imagefs.fs.operations import Operations
from imagefs.fs.tree import Tree
from imagefs.image import Image
from imagefs.layers.service import Layers
from imagefs.reader import BlobReader
from imagefs.testing.images import FileEntry, image, random_bytes, tar_layer

ROOT = pyfuse3.ROOT_INODE
HELLO = b"hello from a layer\n"
BIG = random_bytes(600_000, 3)


class Registry:
    """Blobs from a dict; a digest in ``corrupt`` is served with its last byte flipped, one in
    ``refuse`` fails as the registry client would, one in ``crash`` fails as a bug would."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.corrupt: set[str] = set()
        self.refuse: set[str] = set()
        self.crash: set[str] = set()

    @asynccontextmanager
    async def open(self, desc, start=0, end=None):
        if desc.digest in self.refuse:
            raise RegistryError(f"GET {desc.digest}: 500 Internal Server Error")
        if desc.digest in self.crash:
            raise ValueError("a bug, not an ImagefsError")
        data = self.blobs[desc.digest]
        if desc.digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])

        async def chunks():
            stop = len(data) if end is None else end
            for i in range(start, stop, 65536):
                yield data[i:min(i + 65536, stop)]

        yield chunks()


@pytest.fixture
def built():
    files = {"etc": FileEntry.dir(), "etc/hello": HELLO, "bin": FileEntry.dir(), "bin/sh": FileEntry.symlink("busybox")}
    small = tar_layer(files, compression="none")
    big = tar_layer({"data/big.bin": BIG}, compression="gzip")
    return image([small, big])


@pytest.fixture
async def ops(built, tmp_path, nursery):
    registry = Registry({b.digest: b.data for b in built.blobs.values()})
    store = LocalStore(tmp_path / "cache")
    root = d.Descriptor(built.manifest.media_type, built.manifest.digest, built.manifest.size)
    img = Image(store, registry, root, platform=d.Platform("linux", "amd64"))
    await img.open()
    reader = BlobReader(store, registry, nursery)
    tree = Tree(img, Layers(reader, cache_dir=tmp_path / "cache"), tag="v1")
    operations = Operations(tree, reader)
    operations.registry = registry
    yield operations
    reader.close()


async def errno_of(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def walk(ops: Operations, *names: bytes) -> pyfuse3.EntryAttributes:
    inode = ROOT
    attr = None
    for name in names:
        attr = await ops.lookup(inode, name, None)
        inode = attr.st_ino
    return attr


async def read_all(ops: Operations, inode: int) -> bytes:
    fh = (await ops.open(inode, os.O_RDONLY, None)).fh
    out = bytearray()
    try:
        while True:
            chunk = await ops.read(fh, len(out), 131072)
            if not chunk:
                return bytes(out)
            out += chunk
    finally:
        await ops.release(fh)


def key(blob) -> bytes:
    return d.Descriptor(blob.media_type, blob.digest, blob.size).ref_key.encode()


# -- what works, so the errors below are errors of the right thing ----------------------------------


async def test_a_file_inside_a_layer_reads_through_the_operations(ops, built):
    attr = await walk(ops, key(built.manifest), b"rootfs", b"etc", b"hello")
    assert attr.st_size == len(HELLO)
    assert await read_all(ops, attr.st_ino) == HELLO
    big = await walk(ops, key(built.manifest), b"rootfs", b"data", b"big.bin")
    assert await read_all(ops, big.st_ino) == BIG
    config = await walk(ops, key(built.config), b"blob")
    assert await read_all(ops, config.st_ino) == built.config.data


# -- ENOENT ---------------------------------------------------------------------------------------


async def test_a_missing_name_is_enoent(ops, built):
    assert await errno_of(ops.lookup(ROOT, b"no-such-descriptor", None)) == errno.ENOENT
    manifest = await walk(ops, key(built.manifest))
    assert await errno_of(ops.lookup(manifest.st_ino, b"nothing-here", None)) == errno.ENOENT
    etc = await walk(ops, key(built.manifest), b"rootfs", b"etc")
    assert await errno_of(ops.lookup(etc.st_ino, b"passwd", None)) == errno.ENOENT
    assert await errno_of(ops.getattr(10 ** 9, None)) == errno.ENOENT, "an inode never handed out"


# -- EROFS ----------------------------------------------------------------------------------------


async def test_writes_are_erofs(ops, built):
    blob = await walk(ops, key(built.layers[0]), b"blob")
    hello = await walk(ops, key(built.manifest), b"rootfs", b"etc", b"hello")
    for inode in (blob.st_ino, hello.st_ino):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
            assert await errno_of(ops.open(inode, flags, None)) == errno.EROFS
        assert await errno_of(ops.access(inode, os.W_OK, None)) == errno.EROFS
    await ops.access(blob.st_ino, os.R_OK, None)


async def test_handlers_that_would_write_answer_only_fuse_errors(ops):
    """Writes the kernel lets through to a read-only mount anyway get a FUSEError, never a crash."""
    for name in ("mkdir", "create", "write", "setattr", "unlink", "rmdir", "rename", "symlink", "link",
                 "setxattr", "removexattr", "mknod"):
        method = getattr(ops, name)
        args = [ROOT] + [b"x"] * (len(inspect.signature(method).parameters) - 1)
        with pytest.raises(pyfuse3.FUSEError):
            await method(*args)


# -- EIO ------------------------------------------------------------------------------------------


async def test_a_digest_mismatch_is_eio(ops, built):
    layer = built.layers[0]
    ops.registry.corrupt.add(layer.digest)
    blob = await walk(ops, key(layer), b"blob")
    assert await errno_of(read_all(ops, blob.st_ino)) == errno.EIO
    ops.registry.corrupt.add(built.config.digest)  # a config is verified whole before a byte is served
    config = await walk(ops, key(built.config), b"blob")
    assert await errno_of(read_all(ops, config.st_ino)) == errno.EIO


async def test_a_registry_failure_is_eio(ops, built):
    for layer in built.layers:
        ops.registry.refuse.add(layer.digest)
    blob = await walk(ops, key(built.layers[1]), b"blob")
    assert await errno_of(read_all(ops, blob.st_ino)) == errno.EIO
    # listing a layer's files needs it: the lookup fails, not the mount
    rootfs = await walk(ops, key(built.manifest), b"rootfs")
    assert await errno_of(ops.lookup(rootfs.st_ino, b"etc", None)) == errno.EIO
    ops.registry.refuse.clear()
    etc = await walk(ops, key(built.manifest), b"rootfs", b"etc")
    assert etc.st_mode & 0o040000, "and it works once the registry does"


async def test_an_unexpected_exception_becomes_eio(ops, built):
    ops.registry.crash.add(built.config.digest)
    config = await walk(ops, key(built.config), b"blob")
    assert await errno_of(read_all(ops, config.st_ino)) == errno.EIO


def test_every_request_handler_is_wrapped_once():
    for name, fn in vars(Operations).items():
        if not name.startswith("_") and hasattr(pyfuse3.Operations, name):
            assert hasattr(fn, "__wrapped__"), f"{name} is not wrapped by _fuse_errors"
            assert not hasattr(fn.__wrapped__, "__wrapped__"), f"{name} is wrapped twice"


# -- ENOATTR --------------------------------------------------------------------------------------


async def test_a_missing_xattr_is_enoattr(ops, built):
    blob = await walk(ops, key(built.manifest), b"blob")
    assert await ops.getxattr(blob.st_ino, b"user.imagefs.digest", None) == built.manifest.digest.encode()
    assert await errno_of(ops.getxattr(blob.st_ino, b"user.no-such-label", None)) == pyfuse3.ENOATTR
    hello = await walk(ops, key(built.manifest), b"rootfs", b"etc", b"hello")
    assert await errno_of(ops.getxattr(hello.st_ino, b"user.no-such-label", None)) == pyfuse3.ENOATTR
    # another namespace is "not here at all", so ls -l stops asking for it
    assert await errno_of(ops.getxattr(blob.st_ino, b"security.selinux", None)) == errno.EOPNOTSUPP
    assert b"user.imagefs.mediatype" in await ops.listxattr(blob.st_ino, None)
