"""``imagefs rm REF…``: forget an image, so ``imagefs gc`` can take what only it used.

An image stays in the cache because its root blob carries ``containerd.io/gc.root`` and because
the store remembers the tag it was reached by. ``rm`` drops both — nothing else: blobs are
removed by the next ``gc``, which keeps whatever another image (or a live mount's lease)
still references. A root that another remembered tag still names keeps its label, so forgetting
``app:v1`` does not take ``app:latest`` when both name one digest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .content import maintenance, mounts
from .content.layout import default_cache_dir
from .content.local import LocalStore
from .errors import ImagefsError, NotFound
from .content.labels import GC_ROOT
from .reference import parse


@dataclass(frozen=True)
class Forgotten:
    ref: str
    digest: str
    tags: tuple[str, ...]  # remembered tags dropped
    rooted: bool  # the gc root label was dropped
    still_named: tuple[str, ...]  # other remembered tags of the same root, which keep it
    mounted_at: tuple[str, ...]  # live mounts that keep it until unmounted


def forget(store: LocalStore, ref_text: str) -> Forgotten:
    """Drop ``ref``'s remembered tag(s) and, unless another tag names its root, its gc root."""
    ref = parse(ref_text)
    records = maintenance.tag_records(store)
    if ref.digest:
        digest = ref.digest
        drop = [t for t in records if t.digest == digest and t.name.rpartition(":")[0] == ref.name]
    else:
        assert ref.tag is not None
        remembered = store.recall_tag(ref.name, ref.tag)
        if remembered is None:
            raise NotFound(f"{ref}: not in the cache (no remembered tag; `imagefs ls` lists what is)")
        digest = str(remembered[0].get("digest"))
        drop = [t for t in records if t.name == f"{ref.name}:{ref.tag}"]
    if not drop and store.path(digest) is None:
        raise NotFound(f"{ref}: not in the cache (`imagefs ls` lists what is)")
    for t in drop:
        name, _, tag = t.name.rpartition(":")
        store.forget_tag(name, tag)
    dropped = {t.path for t in drop}
    others = [t.name for t in records if t.digest == digest and t.path not in dropped]
    rooted = False
    if not others and store.path(digest) is not None and GC_ROOT in store.labels(digest):
        store.remove_labels(digest, [GC_ROOT])
        rooted = True
    live = tuple(r.mountpoint for r in mounts.scan(store.root).live if r.root == digest)
    return Forgotten(str(ref), digest, tuple(t.name for t in drop), rooted, tuple(others), live)


def run(args) -> int:
    """``imagefs rm REF…``: each forgotten or one error line; exit 1 if any was not found."""
    store = LocalStore(args.cache_dir or default_cache_dir())
    failed = 0
    for text in args.refs:
        try:
            f = forget(store, text)
        except ImagefsError as exc:
            print(f"imagefs: {exc}", file=sys.stderr)
            failed += 1
            continue
        line = f"forgot {f.ref} ({f.digest})"
        if f.still_named:
            line += f"; still kept as {', '.join(f.still_named)}"
        elif not f.rooted:
            line += ": it was no gc root (part of another image, or forgotten already)"
        if f.mounted_at:
            line += f"; still mounted at {', '.join(f.mounted_at)}: kept until unmounted"
        print(line + ("; `imagefs gc` frees what nothing else uses" if f.rooted else ""))
    return 1 if failed else 0
