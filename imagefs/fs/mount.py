"""A mount's lifetime: resolve, fetch what a mount costs, mount, serve, unmount.

:func:`serve` reports readiness through ``task_status.started()`` only once the kernel mount
exists, so ``imagefs mount … && ls MOUNTPOINT`` works; SIGINT/SIGTERM end it cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from ..content.local import LocalStore
from ..descriptors import Platform
from ..errors import ImagefsError
from ..image import Image, resolve_root
from ..reader import BlobReader
from ..reference import Reference, parse
from ..registry.client import RegistryClient
from .operations import Operations
from .tree import Tree

log = logging.getLogger(__name__)


@dataclass
class MountOptions:
    ref: str
    mountpoint: Path
    cache_dir: Path
    platform: Platform = field(default_factory=Platform.host)
    all_platforms: bool = False
    plain_http: bool = False
    insecure: bool = False
    ca_file: str | None = None
    debug: bool = False


def check_mountpoint(path: Path) -> None:
    """Refuse, before any network, a mount point a user cannot mean."""
    if not path.exists():
        raise ImagefsError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise ImagefsError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise ImagefsError(f"{path} is already a mount point (imagefs umount {path} first)")


def make_client(ref: Reference, opts: MountOptions) -> RegistryClient:
    """The registry client a mount (or any verb that reads a registry) uses."""
    return RegistryClient(
        ref,
        plain_http=opts.plain_http,
        insecure=opts.insecure,
        ca_file=opts.ca_file,
    )


async def serve(opts: MountOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount ``opts.ref`` at ``opts.mountpoint`` and serve until unmounted or signalled."""
    ref = parse(opts.ref)
    check_mountpoint(opts.mountpoint)
    store = LocalStore(opts.cache_dir)
    async with make_client(ref, opts) as client:
        root = await resolve_root(store, client, ref)
        log.info("%s resolved to %s", ref, root.ref_key)
        image = Image(store, client, root, platform=opts.platform, all_platforms=opts.all_platforms)
        await image.open()
        tree = Tree(image, tag=ref.tag)
        async with trio.open_nursery() as nursery:
            reader = BlobReader(store, client, nursery)
            options = set(pyfuse3.default_options)
            options |= {"ro", "subtype=imagefs", f"fsname={str(ref).replace(',', '_')}"}
            if os.getuid() == 0:
                options.add("allow_other")
            if opts.debug:
                options.add("debug")
            pyfuse3.init(Operations(tree, reader), str(opts.mountpoint), options)
            try:
                nursery.start_soon(_signals, nursery)
                log.info("mounted %s at %s", ref, opts.mountpoint)
                task_status.started()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
            finally:
                pyfuse3.close(unmount=True)
                reader.close()
                stats = reader.statistics()
                log.info("unmounted %s: %s", opts.mountpoint, stats)


async def _signals(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
