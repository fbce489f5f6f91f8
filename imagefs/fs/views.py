"""``layer-…/fs/`` and ``manifest-…/rootfs/``: the merged tree behind them, built on first look.

A :class:`View` is one merged tree (:mod:`imagefs.layers.merge`) over some layers. Its directories
become inodes (:class:`~.tree.Tree` makes them) only when someone looks inside them, so a
500,000-file image costs inodes for what is browsed, not for what exists. The first look inside a
view builds (or loads) the index of each of its layers, concurrently; many lookups wait for one
build. Hard links are one inode per link group of the view, with the link count of the paths that
are still visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..descriptors import Descriptor
from ..handlers import dispatch
from ..image import Image
from ..layers.merge import Merged, merge
from ..layers.service import Layers

if TYPE_CHECKING:
    from .tree import Node

BUILD_CONCURRENCY = 2  # layers indexed at once: each is a fetch and an inflate on our 2 cores


@dataclass(eq=False)
class View:
    """The merged tree of ``layers`` (bottom first); ``whiteouts=False`` for one layer's ``fs/``."""

    layers: list[Descriptor]
    whiteouts: bool = True
    merged: Merged | None = None
    links: dict[tuple[int, int], "Node"] = field(default_factory=dict)
    lock: trio.Lock = field(default_factory=trio.Lock)

    async def load(self, layers: Layers, image: Image) -> Merged:
        if self.merged is None:

            async def build(desc: Descriptor) -> list[Descriptor]:
                await layers.index(desc)
                await layers.check_diff_id(image, desc)  # a warning at most: the listing goes on
                return []

            # the first failing layer is the error a reader gets, not a group of them
            await dispatch(build, self.layers, limit=BUILD_CONCURRENCY)
            rows = [layers.cached(d).entries for d in self.layers]
            self.merged = await trio.to_thread.run_sync(lambda: merge(rows, whiteouts=self.whiteouts))
        return self.merged
