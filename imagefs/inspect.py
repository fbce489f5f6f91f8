"""``imagefs inspect REF``: an image's descriptor tree.

It walks the graph as a mount does (:class:`imagefs.image.Image`) but fetches only manifests and
indexes (a mount's cost: the root and the selected platform's manifests; ``--all-platforms`` for
every one), never a config or layer. It reads what the cache already holds and writes nothing to it
but the tag's resolution.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from .cli.verbs import cache_dir, client_for, one_line, quiet_logging, run_verb
from .content.local import LocalStore
from .descriptors import Descriptor, Platform, has_children
from .errors import StorageError
from .handlers import Fetcher
from .image import Image, resolve_root
from .reference import parse
from .units import human


class CacheFirst:
    """A fetcher that serves what the cache holds and asks the registry for the rest."""

    def __init__(self, store: LocalStore, inner: Fetcher) -> None:
        self.store, self.inner = store, inner

    @asynccontextmanager
    async def open(self, desc: Descriptor, start: int = 0, end: int | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        path = self.store.path(desc.digest)
        if path is None:
            async with self.inner.open(desc, start, end) as stream:
                yield stream
            return
        data = await trio.to_thread.run_sync(path.read_bytes)  # manifests only: small

        async def one() -> AsyncIterator[bytes]:
            yield data[start:end]

        yield one()


async def inspect(store: LocalStore, client, ref_text: str, *, platform: Platform, all_platforms: bool) -> dict:
    """The descriptor tree of ``ref``, as JSON-ready dicts; manifests only, the cache untouched."""
    ref = parse(ref_text)
    root = await resolve_root(store, client, ref)
    with tempfile.TemporaryDirectory(prefix="imagefs-inspect-") as tmp:
        image = Image(LocalStore(Path(tmp)), CacheFirst(store, client), root,
                      platform=platform, all_platforms=all_platforms)
        await image.open()
        # Manifests the cache holds cost nothing to show: expand them too.
        for key, kids in list(image.children.items()):
            for kid in kids:
                if has_children(kid) and kid.ref_key not in image.children and store.path(kid.digest) is not None:
                    await image.expand(kid)

    def node(desc: Descriptor, platform: Platform | None) -> dict:
        out: dict = {"refKey": desc.ref_key, "mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}
        if platform is not None:
            out["platform"] = {"os": platform.os, "architecture": platform.architecture,
                               **({"variant": platform.variant} if platform.variant else {})}
        if desc.ref_key in image.children:
            out["children"] = [node(k, k.platform) for k in image.children[desc.ref_key]]
        elif has_children(desc):
            out["children"] = None  # a manifest not fetched: another platform's
        return out

    return {"reference": str(ref), "root": node(root, None)}


def render_tree(doc: dict, out=sys.stdout) -> None:
    print(f"{doc['reference']} -> {doc['root']['digest']}", file=out)

    def line(n: dict) -> str:
        plat = n.get("platform")
        parts = [n["refKey"]]
        if plat:
            parts.append("/".join(p for p in (plat["os"], plat["architecture"], plat.get("variant", "")) if p))
        parts += [n["mediaType"], human(n["size"])]
        if n.get("children", []) is None:
            parts.append("(not fetched; --all-platforms shows it)")
        return "  ".join(parts)

    def walk(n: dict, prefix: str, last: bool, top: bool) -> None:
        print((prefix + ("└── " if last else "├── ") if not top else "") + line(n), file=out)
        kids = n.get("children") or []
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if top else ("    " if last else "│   ")), i == len(kids) - 1, False)

    walk(doc["root"], "", True, True)


def run(args) -> int:
    quiet_logging(getattr(args, "debug", False))
    store = LocalStore(cache_dir(args))

    async def main() -> dict:
        async with client_for(args, args.ref) as client:
            return await inspect(store, client, args.ref, platform=args.platform or Platform.host(),
                                 all_platforms=args.all_platforms)

    try:
        doc = run_verb(main)
    except OSError as exc:
        raise StorageError(f"inspect {args.ref}: {one_line(exc)}") from exc
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render_tree(doc)
    return 0
