"""``layer-…/fs/`` and ``manifest-…/rootfs/`` in the inode table: filled one directory at a time.

A :class:`View` is one merged tree (:mod:`imagefs.layers.merge`) over some layers. Its directories
become inodes only when someone looks inside them, so a 500,000-file image costs inodes for what
is browsed, not for what exists. The first look inside a view builds (or loads) the index of each
of its layers, concurrently; many lookups wait for one build. Hard links are one inode per link
group of the view, with the link count of the paths that are still visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..descriptors import Descriptor
from ..handlers import dispatch
from ..image import Image
from ..layers.entries import DIR, SYMLINK
from ..layers.merge import Merged, merge
from ..layers.service import Layers

if TYPE_CHECKING:
    from .tree import Node, Tree

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


async def populate(tree: "Tree", node: "Node") -> None:
    """Give a view directory its entries (the first time anyone looks inside it).

    The merged tree hands each directory's entries over as they become inodes
    (:meth:`Merged.take`), so an image browsed whole is held once, as inodes, not twice.
    """
    view = node.view
    async with view.lock:
        if not node.pending:
            return
        merged = await view.load(tree.layers, tree.image)
        kids = node.kids = []
        for path, item in merged.take(node.path):
            child = view.links.get(item.key) if item.key is not None else None
            if child is None:
                entry = item.entry
                child = tree._new(entry.st_mode, item=item, view=view)
                if entry.kind == DIR:
                    child.pending = True
                    tree.parents[child.inode] = node.inode
                    below = merged.children.get(path, ())
                    child.nlink = 2 + sum(merged.items[k].entry.kind == DIR for k in below)
                elif entry.kind == SYMLINK:
                    child.target = entry.target.encode("utf-8", "surrogateescape")
                if item.key is not None:
                    child.nlink = merged.nlink[item.key]
                    view.links[item.key] = child
            # named by its entry's path, as Tree.listing does, unless it is a hard link seen by another name
            kids.append(child if child.item.entry.path == path else (path.rpartition("/")[2].encode("utf-8", "surrogateescape"), child))
        node.pending = False
