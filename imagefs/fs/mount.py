"""A mount's lifetime: resolve, fetch what a mount costs, mount, serve, unmount.

:func:`serve` reports readiness through ``task_status.started()`` only once the kernel mount
exists, so ``imagefs mount … && ls MOUNTPOINT`` works; SIGINT/SIGTERM end it cleanly.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from ..content.local import LocalStore
from ..content.mounts import registered
from ..descriptors import Descriptor, Platform
from ..errors import FuseUnavailable, ImagefsError, MountError
from ..handlers import dispatch
from ..image import Image, resolve_root
from ..layers.remote import RemoteIndexes
from ..layers.service import Layers
from ..reader import SPAN, BlobReader
from ..reference import parse
from ..registry.connect import RegistryOptions, make_client
from . import kernel
from .mountpoint import check_mountpoint
from .operations import Operations
from .passthrough import Passthrough
from .tree import Tree

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"


@dataclass
class MountOptions:
    ref: str
    mountpoint: Path
    cache_dir: Path
    platform: Platform = field(default_factory=Platform.host)
    all_platforms: bool = False
    strict: bool = False  # serve no byte of a blob before all of it is verified; no remote index
    remote_index: bool = True  # use SOCI v1 referrers too (v2, bound to the image, is used unless strict)
    prefetch: bool = False  # complete the selected platform's layers in the background
    index: bool = False  # build the selected platform's layer indexes before the mount is ready
    span: int | None = None  # bytes a random read fetches (default: reader.SPAN)
    debug: bool = False
    passthrough: bool = True  # let the kernel read committed blobs from the cache (fs/passthrough.py)
    registry: RegistryOptions = field(default_factory=RegistryOptions)  # how to reach the registry


async def serve(opts: MountOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount ``opts.ref`` at ``opts.mountpoint`` and serve until unmounted or signalled."""
    ref = parse(opts.ref)
    check_mountpoint(opts.mountpoint)
    check_fuse_device()  # before any network: a mount that cannot happen says so at once
    store = LocalStore(opts.cache_dir)
    async with make_client(ref, opts.registry) as client:
        root = await resolve_root(store, client, ref)
        log.info("%s resolved to %s", ref, root.ref_key)
        image = Image(store, client, root, platform=opts.platform, all_platforms=opts.all_platforms)
        await image.open()
        served: tuple[BlobReader, Layers] | None = None
        try:
            async with registered(store, str(ref), opts.mountpoint, image), trio.open_nursery() as nursery:
                reader = BlobReader(store, client, nursery, strict=opts.strict, span=opts.span or SPAN)
                remote = None if opts.strict else RemoteIndexes(image, store, client, client, v1=opts.remote_index)
                layers = Layers(reader, remote, cache_dir=opts.cache_dir)
                tree = Tree(image, layers, tag=ref.tag)
                if opts.index:
                    await _index(image, layers)
                options = set(pyfuse3.default_options)
                options |= {"ro", "subtype=imagefs", f"fsname={str(ref).replace(',', '_')}"}
                if os.getuid() == 0:
                    options.add("allow_other")
                if opts.debug:
                    options.add("debug")
                passthrough = Passthrough(opts.cache_dir) if opts.passthrough else None
                parts = {"reader": reader, "store": store, "registry": client, "layers": layers,
                         "fuse_passthrough": passthrough}  # not "passthrough": a reader key of that name came first
                try:
                    pyfuse3.init(Operations(tree, reader, passthrough, parts), str(opts.mountpoint), options)
                except RuntimeError as exc:  # libfuse wrote its reason to stderr, the mount's log
                    why = f"{exc} (libfuse's reason is in the log)"
                    raise MountError(f"cannot mount {opts.mountpoint}: {why}") from None
                served = (reader, layers)
                if passthrough is not None:
                    passthrough.start()
                try:
                    nursery.start_soon(_signals, nursery)
                    log.info("mounted %s at %s", ref, opts.mountpoint)
                    # What start-up built (modules, the image, the tree) lives as long as the mount:
                    # left out of every later collection, which then walks only what serving makes.
                    gc.freeze()
                    task_status.started()
                    nursery.start_soon(trio.to_thread.run_sync, kernel.tune, opts.mountpoint)
                    if opts.prefetch:
                        nursery.start_soon(_prefetch, image, reader)
                    await pyfuse3.main()
                    nursery.cancel_scope.cancel()
                finally:
                    pyfuse3.close(unmount=True)
                    reader.close()
        finally:
            # Last: after the nursery's tasks (a shielded commit) and the lease (the mount record)
            # have ended, so whoever waits for this line finds the cache as the mount left it.
            if served is not None:
                log.info("unmounted %s: %s; %s", opts.mountpoint, served[0].statistics(), served[1].stats)


def check_fuse_device(device: str | None = None) -> None:
    """Refuse in one line, saying what to do, when the kernel's FUSE device cannot be opened.

    libfuse opens it before it mounts and, failing, says only "fuse_session_mount failed" after a
    line on stderr; a user should not have to read a log to learn the module is not loaded.
    """
    device = device or FUSE_DEVICE
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            todo = "load the fuse module (modprobe fuse); in a container, pass the device (--device /dev/fuse)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            todo = "run as root, or give this user read-write access to it (the fuse group on some systems)"
        else:
            todo = "check that FUSE works on this machine (modprobe fuse; in a container --device /dev/fuse)"
        raise FuseUnavailable(f"cannot open {device}: {exc.strerror or exc} — {todo}") from None


async def _prefetch(image: Image, reader: BlobReader) -> None:
    """Complete every layer of the selected platform(s), two at a time, as ``--prefetch`` asks."""
    layers = image.selected_layers()
    failed = 0

    async def one(desc: Descriptor) -> list[Descriptor]:
        nonlocal failed
        try:
            await reader.prefetch(desc)
        except ImagefsError as exc:  # a reader of that blob will see it too; the mount goes on
            failed += 1
            log.error("prefetch of %s failed: %s", desc.ref_key, exc)
        return []

    await dispatch(one, layers, limit=2)
    log.info("prefetch complete: %d layers%s", len(layers) - failed, f", {failed} failed" if failed else "")


async def _index(image: Image, layers: Layers) -> None:
    """Build (or load) the index of every layer of the selected platform(s), as ``--index`` asks."""
    found = image.selected_layers()

    async def one(desc: Descriptor) -> list[Descriptor]:
        await layers.index(desc)
        return []

    await dispatch(one, found, limit=2)  # a failing layer is one clear error, not a group
    await layers.settled()  # and kept in the cache, as --index promises the next mount
    log.info("indexes ready: %d layers", len(found))


async def _signals(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
