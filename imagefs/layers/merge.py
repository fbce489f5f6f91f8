"""Layers applied in order, with OCI whiteouts: the tree that ``rootfs/`` (or one ``fs/``) lists.

The OCI image spec's rules: a ``.wh.NAME`` member removes ``NAME`` (and all below it) from the
layers beneath; a ``.wh..wh..opq`` member hides every lower entry of its directory, wherever it
stands in the tar; other ``.wh..wh.*`` names are reserved and ignored; whiteout members are never
shown. A layer's whiteouts apply to the layers below it only, so each layer's whiteouts are
applied before its entries are added. A path that must be a directory for a member below it
becomes one. ``fs/`` of one layer is the same tree with whiteouts shown as the files they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .entries import DIR, FILE, HARDLINK, Entry

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True, slots=True)
class Item:
    """A visible entry: which layer (by position in the view) holds it."""

    layer: int
    entry: Entry
    linked: bool = False  # the target of a hard link from an upper layer

    @property
    def key(self) -> tuple[int, int] | None:
        """Hard links share this (a member's data offset is unique in its layer): one inode."""
        return (self.layer, self.entry.offset) if self.entry.link >= 0 or self.linked else None


@dataclass
class Merged:
    """``items``: path -> Item; ``children``: directory path -> its entries' paths, in order;
    ``nlink`` per link group.

    ``children`` holds full paths (the very string objects that key ``items`` and sit in each
    Entry), not names: a name apiece would be one more string per member of the image.
    """

    items: dict[str, Item] = field(default_factory=dict)
    children: dict[str, dict[str, None]] = field(default_factory=lambda: {"": {}})
    nlink: dict[tuple[int, int], int] = field(default_factory=dict)

    def remove(self, path: str) -> None:
        item = self.items.pop(path, None)
        if item is None:
            return
        self.children.get(path.rpartition("/")[0], {}).pop(path, None)
        self._unlink(item)
        below = self.children.pop(path, None)
        for kid in below or ():
            self.remove(kid)

    def clear(self, path: str) -> None:
        """Remove everything below ``path`` (an opaque directory)."""
        for kid in list(self.children.get(path, ())):
            self.remove(kid)

    def take(self, path: str) -> list[tuple[str, Item]]:
        """Hand over directory ``path``'s entries and forget them here (each directory is listed
        once, into inodes): browsing the whole image then never holds the tree twice."""
        kids = self.children.pop(path, {})
        return [(kid, self.items.pop(kid)) for kid in kids]

    def put(self, path: str, item: Item) -> None:
        if path == "":
            self.items[""] = item
            return
        head = path.rpartition("/")[0]
        self._ensure_dir(head, item.layer)
        old = self.items.get(path)
        if old is not None and not (old.entry.kind == DIR and item.entry.kind == DIR):
            self.remove(path)
        elif old is not None:
            self._unlink(old)
        self.items[path] = item
        self.children[head][path] = None
        if item.entry.kind == DIR:
            self.children.setdefault(path, {})
        if item.key is not None:
            self.nlink[item.key] = self.nlink.get(item.key, 0) + 1

    def link(self, path: str, target: str) -> None:
        """A hard link to a file of a lower layer: the same inode; nothing if the target is not a file."""
        source = self.items.get(target)
        if source is None or source.entry.kind != FILE:
            return
        if source.key is None:
            source = self.items[target] = Item(source.layer, source.entry, linked=True)
            self.nlink[source.key] = 1
        self.put(path, Item(source.layer, source.entry, linked=True))

    def _ensure_dir(self, path: str, layer: int) -> None:
        if path in self.children:  # only directories have a children entry
            return
        self.put(path, Item(layer, Entry(path, DIR, 0o755)))

    def _unlink(self, item: Item) -> None:
        if item.key is not None:
            self.nlink[item.key] -= 1


def merge(layers: list[list[Entry]], *, whiteouts: bool = True) -> Merged:
    """The visible tree of ``layers`` (bottom first); ``whiteouts=False`` lists members as they are."""
    m = Merged()
    for n, entries in enumerate(layers):
        if whiteouts:
            for e in entries:
                name = e.name
                if not name.startswith(WHITEOUT):
                    continue
                head = e.path.rpartition("/")[0]
                if name == OPAQUE:
                    m.clear(head)
                elif not name.startswith(WHITEOUT + WHITEOUT):
                    m.remove(f"{head}/{name[len(WHITEOUT):]}" if head else name[len(WHITEOUT):])
        for e in entries:
            if e.kind == HARDLINK:
                if whiteouts:
                    m.link(e.path, e.target)
            elif not (whiteouts and e.name.startswith(WHITEOUT)):
                m.put(e.path, Item(n, e))
    return m
