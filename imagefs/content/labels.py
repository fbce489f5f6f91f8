"""The names of the labels a committed blob carries, in one place.

containerd's garbage collector marks from blobs labelled ``gc.root`` and follows
``gc.ref.content.<i>`` labels to their children; imagefs writes the same names (DESIGN.md §2), so
``gc``, ``fsck``, ``rm``, ``ls``, the fetch handlers and the mount's xattrs all read them from here.
On disk they are ``user.`` xattrs of the blob, or a sidecar file (:mod:`.layout`).
"""

from __future__ import annotations

from datetime import datetime, timezone

#: on an image's root blob: the RFC 3339 UTC time it was first fetched as a root
GC_ROOT = "containerd.io/gc.root"
#: prefix of ``gc.ref.content.<i>``: the digest of child ``i`` of a manifest or index
GC_REF = "containerd.io/gc.ref.content."
#: containerd's label for a compressed layer's diff_id, set once imagefs has inflated it
UNCOMPRESSED = "containerd.io/uncompressed"
#: the descriptor's media type: a blob alone does not say what it is
MEDIATYPE = "imagefs.mediatype"


def gc_ref(i: int) -> str:
    """The label naming child ``i``."""
    return f"{GC_REF}{i}"


def now_rfc3339() -> str:
    """Now, as ``gc.root`` and the store's records write it: RFC 3339, UTC, whole seconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
