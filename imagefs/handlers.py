"""Fetching and walking the descriptor graph: the port of containerd's ``remotes/handlers.go``.

:func:`fetch` takes the store's writer for a descriptor's ref key, backing off with jitter while
another task holds it, streams the blob in and commits it with its gc labels. Handlers compose as
containerd's ``images.Handler`` do: a handler takes a descriptor and returns its children;
:func:`dispatch` walks a graph concurrently in a trio nursery, each descriptor once.
"""

from __future__ import annotations

import logging
import random
from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator, Awaitable, Callable, Iterable, Protocol

import trio

from .content import labels
from .content.labels import now_rfc3339
from .content.store import Ingester, Writer
from .descriptors import MAX_MANIFEST_SIZE, Descriptor, check_supported, children, has_children, verify
from .errors import AlreadyExists, InvalidManifest, Unavailable

log = logging.getLogger(__name__)

# The label names live in content/labels.py; these names are kept for callers that know them here.
GC_ROOT, GC_REF, MEDIATYPE_LABEL = labels.GC_ROOT, labels.GC_REF, labels.MEDIATYPE

# The backoff of containerd's fetch, in milliseconds.
RETRY_START_MS = 16
RETRY_MAX_MS = 2048


class Fetcher(Protocol):
    def open(self, desc: Descriptor, start: int = 0, end: int | None = None) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream ``desc``'s bytes ``[start, end)``."""


Handler = Callable[[Descriptor], Awaitable[list[Descriptor]]]


class Backoff:
    """containerd's jittered exponential backoff: sleep ``rand[0, retry)`` ms, double to 2048.

    A little randomness stops a thundering herd of waiters from retrying in lock step.
    """

    def __init__(self) -> None:
        self.retry = RETRY_START_MS
        self.waits = 0

    def next_delay(self) -> float:
        delay = random.randrange(self.retry) / 1000
        if self.retry < RETRY_MAX_MS:
            self.retry <<= 1
        self.waits += 1
        return delay

    async def wait(self) -> None:
        await trio.sleep(self.next_delay())


async def acquire(ingester: Ingester, desc: Descriptor) -> Writer | None:
    """The writer for ``desc``, or None once it is committed (by us or anyone else)."""
    backoff = Backoff()
    while True:
        try:
            return ingester.writer(desc.ref_key, desc.size, desc.digest)
        except AlreadyExists:
            return None
        except Unavailable as exc:
            if backoff.waits == 0 or backoff.retry == RETRY_MAX_MS:
                log.debug("waiting for %s", exc)
            await backoff.wait()  # cancellation of the caller ends the wait


def commit_labels(desc: Descriptor, kids: list[Descriptor], root: bool) -> dict[str, str]:
    """The labels containerd's ``commitOpts`` records, plus the media type (a blob alone has none)."""
    out = {labels.MEDIATYPE: desc.media_type}
    if root:
        out[labels.GC_ROOT] = now_rfc3339()
    for i, child in enumerate(kids):
        out[labels.gc_ref(i)] = child.digest
    return out


async def fetch(ingester: Ingester, fetcher: Fetcher, desc: Descriptor, *, root: bool = False) -> None:
    """Make ``desc`` committed in the store, fetching it unless someone else already is or has."""
    check_supported(desc.media_type)
    _check_manifest_size(desc)  # before any writer: an ingest is sized by the descriptor
    writer = await acquire(ingester, desc)
    if writer is None:
        return
    with writer:
        await copy(writer, fetcher, desc, root=root)


async def copy(writer: Writer, fetcher: Fetcher, desc: Descriptor, *, root: bool = False) -> None:
    """Stream ``desc`` into ``writer`` and commit it; for manifests, children are parsed from a tee."""
    _check_manifest_size(desc)
    tee = bytearray() if has_children(desc) else None
    # A blob resumes after what an earlier process left; a manifest is re-read whole for the tee.
    pos = 0 if tee is not None else writer.offset
    if pos == 0 or pos < desc.size:  # a verified ingest kept after a refused commit needs no byte more
        async with fetcher.open(desc, pos) as stream:
            async for chunk in stream:
                await writer.write_at(pos, chunk)
                pos += len(chunk)
                if tee is not None:
                    tee += chunk
    kids: list[Descriptor] = []
    if tee is not None:
        verify(desc, bytes(tee))  # never parse bytes we cannot vouch for
        kids = children(desc, bytes(tee))
    await writer.commit(commit_labels(desc, kids, root))
    log.info("committed %s (%d bytes)", desc.ref_key, desc.size)


def _check_manifest_size(desc: Descriptor) -> None:
    if has_children(desc) and desc.size > MAX_MANIFEST_SIZE:
        raise InvalidManifest(f"{desc.ref_key}: a manifest of {desc.size} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit")


async def dispatch(handler: Handler, descs: Iterable[Descriptor], *, limit: int = 8) -> None:
    """Run ``handler`` on every descriptor reachable from ``descs``, concurrently, each once.

    The first error cancels the walk and is raised alone: a user is told one clear reason, not a
    group of the same failure from sibling tasks.
    """
    seen: set[str] = set()
    limiter = trio.CapacityLimiter(limit)
    errors: list[Exception] = []

    async def visit(desc: Descriptor, nursery: trio.Nursery) -> None:
        try:
            async with limiter:
                kids = await handler(desc)
        except Exception as exc:
            errors.append(exc)
            nursery.cancel_scope.cancel()
            return
        for kid in kids:
            if kid.ref_key not in seen:
                seen.add(kid.ref_key)
                nursery.start_soon(visit, kid, nursery)

    async with trio.open_nursery() as nursery:
        for desc in descs:
            if desc.ref_key not in seen:
                seen.add(desc.ref_key)
                nursery.start_soon(visit, desc, nursery)
    if errors:
        raise errors[0]
