"""The inode table of a mount: the layout of DESIGN.md §1, grown as the graph is discovered.

Directory entries are only ever appended, so a ``readdir`` offset (an entry's position) stays
valid while discovery adds descriptors under a reader's feet. ``.`` and ``..`` are not entries
here: ``readdir`` adds them, with :meth:`Tree.parent`.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import pyfuse3

from ..descriptors import LAYER_TYPES, OCI_INDEX, Descriptor, has_children, is_manifest
from ..errors import NotFound
from ..image import Image
from ..layers.entries import DIR, SYMLINK
from ..layers.merge import Item
from ..layers.service import Layers
from .views import View

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777
_NO_NAMES: Sequence[bytes] = ()
_NO_INDEX: Mapping[bytes, int] = MappingProxyType({})


@dataclass(eq=False, slots=True)
class Node:
    """One inode. Slotted, and a file shares the empty ``names``/``index`` of every file: a mount
    that lists 500,000 files of an image holds 500,000 of these.

    A directory of the descriptor tree lists ``names`` (its index maps them to inodes). A view
    directory (in ``fs/``, ``rootfs/``) lists ``kids`` instead: the child nodes themselves, each
    named by its tar entry's path, so the image's names are not held a second time as bytes; a
    child whose name is not its entry's (a hard link) is kept as ``(name, node)``. Its ``index``
    is built on the first lookup inside it (:meth:`Tree.child`).
    """

    inode: int
    mode: int
    desc: Descriptor | None = None  # the descriptor a descriptor dir or blob file stands for
    data: bytes | None = None  # contents of a static file
    target: bytes = b""  # symlink target
    names: Sequence[bytes] = _NO_NAMES  # dir entries, in order (a list once the first is added)
    index: Mapping[bytes, int] = field(default_factory=lambda: _NO_INDEX)  # name -> inode
    nlink: int = 1
    # Inside fs/ and rootfs/: the view this node belongs to, the tar entry it shows (None for a
    # view's top), and whether its entries are still to be listed.
    view: View | None = None
    item: Item | None = None
    pending: bool = False
    kids: "list[Node | tuple[bytes, Node]] | None" = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def path(self) -> str:
        """The path in its view (a directory's entry is its own, never a hard link's)."""
        return self.item.entry.path if self.item is not None else ""

    def add(self, name: bytes, inode: int) -> None:
        if self.names is _NO_NAMES:
            self.names, self.index = [], {}
        if name not in self.index:
            self.index[name] = inode  # type: ignore[index]
            self.names.append(name)  # type: ignore[attr-defined]


class Tree:
    """Nodes for one :class:`Image`; listens to it so new descriptors appear at once.

    ``layers`` indexes the layers that ``fs/`` and ``rootfs/`` list; without it (a test of the
    descriptor graph alone) those directories cannot be opened.
    """

    def __init__(self, image: Image, layers: Layers | None = None, *, tag: str | None = None) -> None:
        self.image = image
        self.layers = layers
        self.nodes: list[Node] = []  # inode n is nodes[n - ROOT_INODE]: numbered in order of creation
        # directory inode -> its parent's, for ``..`` (kept for directories only: files are most nodes)
        self.parents: dict[int, int] = {}
        self.top = self._new(DIR_MODE)  # the first node: ROOT_INODE
        self.top.nlink = 2
        self.dirs: dict[str, Node] = {}  # ref key -> descriptor dir
        self.blobs: dict[str, Node] = {}  # digest -> blob file (one inode however it is reached)
        self.expanded: set[str] = set()
        root = image.root
        self._link(self.top, b"root", root.ref_key.encode())
        layout = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
        self._file(self.top, b"oci-layout", layout)
        entry = root.to_json()
        if tag:
            entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        self._file(self.top, b"index.json", json.dumps(index, indent=2).encode() + b"\n")
        blobs = self._dir(self.top, b"blobs")
        self.sha256 = self._dir(blobs, b"sha256")
        for desc in image.descriptors.values():
            self._on_descriptor(desc)
        image.listeners.append(self._on_descriptor)
        if image.selected:  # the selected platform's files, as `ls MOUNT/rootfs/` expects
            self._link(self.top, b"rootfs", image.selected[0].ref_key.encode() + b"/rootfs")

    # -- building -------------------------------------------------------------------------------

    def _new(self, mode: int, **kw) -> Node:
        node = Node(len(self.nodes) + pyfuse3.ROOT_INODE, mode, **kw)
        self.nodes.append(node)
        return node

    def _dir(self, parent: Node, name: bytes, desc: Descriptor | None = None) -> Node:
        node = self._new(DIR_MODE, desc=desc, nlink=2)
        parent.add(name, node.inode)
        self.parents[node.inode] = parent.inode
        parent.nlink += 1
        return node

    def _file(self, parent: Node, name: bytes, data: bytes) -> Node:
        node = self._new(FILE_MODE, data=data)
        parent.add(name, node.inode)
        return node

    def _link(self, parent: Node, name: bytes, target: bytes) -> None:
        if name not in parent.index:
            parent.add(name, self._new(LINK_MODE, target=target).inode)

    def _on_descriptor(self, desc: Descriptor) -> None:
        key = desc.ref_key
        if key in self.dirs:
            return
        d = self._dir(self.top, key.encode(), desc)
        self.dirs[key] = d
        blob = self.blobs.get(desc.digest)
        if blob is None:  # one inode per digest, however many media types name it
            blob = self.blobs[desc.digest] = self._new(FILE_MODE, desc=desc)
            self.sha256.add(desc.hex.encode(), blob.inode)
        blob.nlink += 1
        d.add(b"blob", blob.inode)
        if desc.media_type in LAYER_TYPES:
            self._view(d, b"fs", View([desc], whiteouts=False))
        if key in self.image.children:
            self._add_children(desc)

    def _add_children(self, desc: Descriptor) -> None:
        d = self.dirs[desc.ref_key]
        for kid in self.image.children.get(desc.ref_key, []):
            self._link(d, kid.ref_key.encode(), b"../" + kid.ref_key.encode())
        if is_manifest(desc) and b"rootfs" not in d.index:
            layers = [k for k in self.image.children[desc.ref_key][1:] if k.media_type in LAYER_TYPES]
            self._view(d, b"rootfs", View(layers))
        self.expanded.add(desc.ref_key)

    def _view(self, parent: Node, name: bytes, view: View) -> None:
        """A view's top directory; its entries are listed on first look (:meth:`_populate`)."""
        node = self._dir(parent, name)
        node.view, node.pending = view, True

    async def _populate(self, node: Node) -> None:
        """Give a view directory its entries (the first time anyone looks inside it).

        The merged tree hands each directory's entries over as they become inodes
        (:meth:`Merged.take`), so an image browsed whole is held once, as inodes, not twice.
        """
        view = node.view
        if self.layers is None:
            raise NotFound(f"{node.path or 'a layer view'}: this tree reads no layers")
        async with view.lock:
            if not node.pending:
                return
            merged = await view.load(self.layers, self.image)
            kids = node.kids = []
            for path, item in merged.take(node.path):
                child = view.links.get(item.key) if item.key is not None else None
                if child is None:
                    entry = item.entry
                    child = self._new(entry.st_mode, item=item, view=view)
                    if entry.kind == DIR:
                        child.pending = True
                        self.parents[child.inode] = node.inode
                        below = merged.children.get(path, ())
                        child.nlink = 2 + sum(merged.items[k].entry.kind == DIR for k in below)
                    elif entry.kind == SYMLINK:
                        child.target = entry.target.encode("utf-8", "surrogateescape")
                    if item.key is not None:
                        child.nlink = merged.nlink[item.key]
                        view.links[item.key] = child
                # named by its entry's path, as listing() does, unless it is a hard link seen by another name
                name = path.rpartition("/")[2].encode("utf-8", "surrogateescape")
                kids.append(child if child.item.entry.path == path else (name, child))
            node.pending = False

    async def expand(self, node: Node) -> None:
        """Make sure a directory lists its entries: a manifest's or index's children (fetching it if
        needed), or a view directory's files (indexing its layers if needed)."""
        if node.pending:
            await self._populate(node)
            return
        desc = node.desc
        if desc is None or not node.is_dir or not has_children(desc) or desc.ref_key in self.expanded:
            return
        await self.image.expand(desc)
        self._add_children(desc)

    def listing(self, node: Node, start: int = 0) -> Iterator[tuple[bytes, Node]]:
        """``node``'s entries from position ``start``: positions stay valid (entries are only appended)."""
        kids = node.kids
        if kids is not None:
            for i in range(start, len(kids)):
                kid = kids[i]
                if type(kid) is tuple:
                    yield kid
                else:
                    yield kid.item.entry.path.rpartition("/")[2].encode("utf-8", "surrogateescape"), kid
        else:
            names, index, nodes = node.names, node.index, self.nodes
            for i in range(start, len(names)):
                yield names[i], nodes[index[names[i]] - pyfuse3.ROOT_INODE]

    def child(self, node: Node, name: bytes) -> Node | None:
        """The entry ``name`` of directory ``node``, or None."""
        if node.kids and not node.index:  # a view directory's first lookup: name it now
            node.index = {n: kid.inode for n, kid in self.listing(node)}
        inode = node.index.get(name)
        return None if inode is None else self.nodes[inode - pyfuse3.ROOT_INODE]

    def parent(self, node: Node) -> Node:
        """The directory ``..`` names: the mount's top is its own parent, as a filesystem root is."""
        return self.nodes[self.parents.get(node.inode, pyfuse3.ROOT_INODE) - pyfuse3.ROOT_INODE]

    def get(self, inode: int) -> Node:
        """The node of ``inode``; KeyError for one this mount never handed out."""
        n = inode - pyfuse3.ROOT_INODE
        if 0 <= n < len(self.nodes):
            return self.nodes[n]
        raise KeyError(inode)
