"""How far a pull or copy has got: a bar per blob in flight on a terminal (rich), else one plain line
per finished blob — ``fetched layer-sha256:… 3.0 MiB`` or ``exists config-sha256:… 1.4 KiB`` — so logs
and CI output stay readable; and a fetcher that reports every byte it streams.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator, Protocol

from .descriptors import Descriptor
from .handlers import Fetcher
from .units import human


#: Outcomes of a blob that moved no bytes through us: cached already, present at the destination, or
#: mounted there from another repository (``imagefs copy``).
WITHOUT_BYTES = frozenset({"exists", "skipped", "mounted"})


class Progress(Protocol):
    def planned(self, desc: Descriptor) -> None:
        """``desc`` will be fetched or found: it counts in the total."""

    def advance(self, desc: Descriptor, nbytes: int) -> None:
        """``nbytes`` more of ``desc`` arrived."""

    def done(self, desc: Descriptor, outcome: str) -> None:
        """``desc`` is ``fetched``, ``exists`` (was cached) or ``failed``; for a copy ``uploaded``,
        ``skipped`` (present at the destination) or ``mounted`` (from another repository)."""

    def close(self) -> None: ...


class PlainProgress:
    """One line per finished blob, for logs and pipes."""

    def __init__(self, out=sys.stdout) -> None:
        self.out = out

    def planned(self, desc: Descriptor) -> None:
        pass

    def advance(self, desc: Descriptor, nbytes: int) -> None:
        pass

    def done(self, desc: Descriptor, outcome: str) -> None:
        print(f"{outcome:<7} {desc.ref_key} {human(desc.size)}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A bar per blob in flight and one for the total; finished blobs scroll above as lines."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.console = Console()
        self.bars = Progress(
            TextColumn("{task.description}", style="bold"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.total = self.bars.add_task("total", total=0)
        self.tasks: dict[str, int] = {}
        self.known: set[str] = set()
        self.bars.start()

    def planned(self, desc: Descriptor) -> None:
        if desc.digest not in self.known:
            self.known.add(desc.digest)
            self.bars.update(self.total, total=(self.bars.tasks[self.total].total or 0) + desc.size)

    def advance(self, desc: Descriptor, nbytes: int) -> None:
        self.planned(desc)
        task = self.tasks.get(desc.digest)
        if task is None:
            name = desc.ref_key.split(":", 1)[0] + ":" + desc.hex[:12]
            task = self.tasks[desc.digest] = self.bars.add_task(name, total=desc.size)
        self.bars.advance(task, nbytes)
        self.bars.advance(self.total, nbytes)

    def done(self, desc: Descriptor, outcome: str) -> None:
        self.planned(desc)
        task = self.tasks.pop(desc.digest, None)
        if task is not None:
            self.bars.remove_task(task)
        if outcome in WITHOUT_BYTES:
            self.bars.advance(self.total, desc.size)
        style = {"fetched": "green", "uploaded": "green", "mounted": "cyan", "failed": "red"}.get(
            outcome, "dim" if outcome in WITHOUT_BYTES else "")
        self.bars.console.print(f"[{style}]{outcome:<7}[/] {desc.ref_key} {human(desc.size)}", highlight=False,
                                soft_wrap=True)

    def close(self) -> None:
        self.bars.stop()


class ProgressFetcher:
    """A :class:`Fetcher` that tells a :class:`Progress` of every byte it streams."""

    def __init__(self, inner: Fetcher, progress: Progress) -> None:
        self.inner, self.progress = inner, progress
        self.streamed: dict[str, int] = {}

    @asynccontextmanager
    async def open(self, desc: Descriptor, start: int = 0, end: int | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        self.streamed.setdefault(desc.digest, 0)
        async with self.inner.open(desc, start, end) as stream:
            yield self._count(desc, stream)

    async def _count(self, desc: Descriptor, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in stream:
            self.streamed[desc.digest] += len(chunk)
            self.progress.advance(desc, len(chunk))
            yield chunk
