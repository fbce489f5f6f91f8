"""The one inflate of a gzip layer: everything its index needs, from a single pass.

First contact with a plain gzip image (no zTOC in the registry) and ``copy --soci`` both need,
per layer: the tar's members, the uncompressed digest (``rootfs.diff_ids``), inflate checkpoints
and a sha256 per compressed span. Until issue 11 the local pass inflated the layer twice (once
through indexed_gzip for the checkpoints, once through zlib for the tar), one after the other.
Now one read of the blob feeds two threads at once: :mod:`zlib` inflates the tar for the scan
(:func:`.tarindex.scan`) and the diff_id, while indexed_gzip, from a second reader of the same
bytes, expands its index over the stream and records a candidate checkpoint at a deflate block
boundary every ``spacing`` uncompressed bytes (both inflate without the GIL). That is still two
inflates, but side by side on two cores: indexed_gzip reading the tar itself (the one-thread
mode, without ``index_stream``) also inflates every byte twice, its index expansion and then the
read, in one thread. The candidates are then thinned by :mod:`.spans`' rule, and only the chosen
ones' 32 KiB windows are read back (indexed_gzip's export goes to a temporary file, not memory).
A mount feeds the pass with the blob as it arrives (:func:`inflate_stream`), so fetching and
inflating overlap; ``copy --soci`` reads the committed file. What the pass found becomes an index
or a zTOC in :mod:`.gzindex` (the chosen checkpoints, then the span digests: a second *read* of the
committed blob, never a third inflate).

indexed_gzip against rapidgzip (parallel inflate) for this pass is measured in ``bench/RESULTS.md``
(Issue 11): at the candidate spacing the span rule needs, indexed_gzip is the faster here.

:func:`statistics` counts the passes and the tar bytes they produced, so a test can check that a
layer was inflated once and benchmarks can say so.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import os
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from typing import Callable

import indexed_gzip

from ..errors import InvalidLayer
from . import diffids, spans, tarindex, zinfo
from .entries import Entry
from .streams import Counting
from .zinfo import WINDOW, Checkpoint, gzip_isize
from .zran import header_length

#: at most this many candidates are held (indexed_gzip keeps each window in memory until the export)
MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class PassStatistics:
    passes: int = 0  # whole-layer passes (one read of the blob; the tar and the checkpoints side by side)
    inflated: int = 0  # tar bytes they produced: a layer passed once adds its tar's size


_stats = PassStatistics()
_stats_lock = threading.Lock()


def statistics() -> PassStatistics:
    """Totals for this process (a frozen record, as trio's ``statistics()``)."""
    return _stats


def _count(inflated: int) -> None:
    global _stats
    with _stats_lock:
        _stats = PassStatistics(_stats.passes + 1, _stats.inflated + inflated)


@dataclass
class Pass:
    """What one inflate found. ``candidates`` are offsets only; :meth:`checkpoints` reads the
    windows of the ones chosen from the export, which :meth:`close` removes."""

    size: int  # the blob's
    first: spans.Point  # just past the gzip header: inflating starts there with an empty window
    entries: list[Entry]
    skipped: int
    tar_size: int
    uncompressed: str  # "sha256:…" of the whole stream ("" if its tail would not inflate)
    ranges: spans.DataRanges
    candidates: list[spans.Point]
    _export: io.BufferedReader | None = None
    _window_at: dict[tuple[int, int], int] = field(default_factory=dict)

    def checkpoints(self, chosen: list[spans.Point]) -> list[Checkpoint]:
        out = []
        for p in chosen:
            if p == self.first:
                out.append(Checkpoint(p.compressed, 0, 0, bytes(WINDOW)))
                continue
            pos = self._window_at[(p.compressed, p.uncompressed)]
            self._export.seek(pos)
            window = self._export.read(WINDOW)
            if len(window) != WINDOW:
                raise InvalidLayer("indexed_gzip's exported index ends inside a window")
            out.append(Checkpoint(p.compressed, p.uncompressed, p.bits, window))
        return out

    def close(self) -> None:
        if self._export is not None:
            self._export.close()
            self._export = None

    def __enter__(self) -> "Pass":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spacing_for(estimate: int, dense: int = spans.DENSE) -> int:
    """Uncompressed bytes between candidates: a quarter of a dense span (several candidates per span
    where the data compresses), yet few enough that the windows held stay under ``MAX_CANDIDATES``
    for a tar of about ``estimate`` bytes (a gzip trailer's size, mod 4 GiB, or the blob's)."""
    return max(dense // 4, 2 * WINDOW, -(-estimate // MAX_CANDIDATES))


def inflate(path: str, label: str, *, dense: int = spans.DENSE, on_member: Callable | None = None,
            progress: bool = True, split: bool = True) -> Pass:
    """One inflate of the committed gzip blob at ``path`` (blocking: run it in a thread).

    ``on_member(info)`` sees every :class:`tarfile.TarInfo` (``copy --soci`` records zTOC rows).
    ``split``: the tar and the checkpoints in two threads (:func:`inflate_stream`)."""
    with open(path, "rb", buffering=0) as f, open(path, "rb", buffering=0) as g:
        size = os.fstat(f.fileno()).st_size
        return inflate_stream(f, size, label, estimate=max(size, gzip_isize(path)), dense=dense,
                              on_member=on_member, progress=progress, index_stream=g if split else None)


class _Inflating(io.RawIOBase):
    """The tar inside a gzip stream (members one after another, zero padding after the last, as
    :mod:`gzip` reads them), through :mod:`zlib` (which releases the GIL as it inflates); each tar
    byte is counted, and hashed once (the diff_id) in a thread of its own, up to
    :data:`HASH_BEHIND` chunks behind: the thread that inflates and scans the tar is the pass's
    longest, and hashlib releases the GIL (one chunk behind, it waited for the hash 0.2 s a mount
    when the other core was busy)."""

    def __init__(self, raw) -> None:
        super().__init__()
        self.raw = raw
        self.h = hashlib.sha256()
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imagefs-diffid")
        self._hashing: collections.deque[concurrent.futures.Future] = collections.deque()  # in order, one worker
        self.produced = 0
        self._d = zlib.decompressobj(31)
        self._pending = b""  # compressed bytes read, not yet given to the decompressor
        self._eof = False
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        out = self.chunk(len(buf))
        n = len(out)
        buf[:n] = out
        return n

    def chunk(self, limit: int = 4 << 20) -> bytes:
        """The next at most ``limit`` tar bytes (``b""`` at the end), without a copy: what
        :class:`.tarindex.Forward` reads."""
        while True:
            # at a member's end zlib may leave what follows it in unconsumed_tail as well as in
            # unused_data (when the call before stopped at ``limit``): only unused_data is read on
            if self._d.unconsumed_tail and not self._d.eof:
                data = self._d.unconsumed_tail
            elif self._pending:
                data, self._pending = self._pending, b""
            elif self._eof:
                return b""
            else:
                data = self.raw.read(READ)
                if not data:  # a stream cut inside a member ends here too: the tar scan says
                    self._eof, self.truncated = True, not self._d.eof  # where, and there is no diff_id
                    return b""
            if self._d.eof:  # between members: zero padding, then another member or the end
                data = data.lstrip(b"\0")
                if not data:
                    continue
                while len(data) < 2:  # a member's magic cut by a read: the rest of it
                    more = self.raw.read(READ)
                    if not more:
                        break
                    data += more
                if not data.startswith(b"\x1f\x8b"):  # trailing bytes that are no member: ignored,
                    self._eof = True  # as gzip -dc and indexed_gzip do
                    return b""
                self._d = zlib.decompressobj(31)
            out = self._d.decompress(data, limit)
            if self._d.eof and self._d.unused_data:
                self._pending = self._d.unused_data
            if out:
                self._hash(out)
                self.produced += len(out)
                return out

    def _hash(self, chunk: bytes) -> None:
        if len(self._hashing) >= HASH_BEHIND:
            self._hashing.popleft().result()
        self._hashing.append(self._hasher.submit(self.h.update, chunk))

    def close(self) -> None:
        self._hasher.shutdown(wait=True)
        super().close()

    def finish(self) -> str | None:
        """``sha256:…`` of the whole tar stream, or None if its tail cannot be inflated."""
        try:
            while self.chunk():
                pass
        except diffids.INFLATE_ERRORS:
            return None
        while self._hashing:
            self._hashing.popleft().result()
        return None if self.truncated else "sha256:" + self.h.hexdigest()


READ = 4 << 20  # compressed bytes a read of the tar stream asks for (each a trip through trio when it arrives)
HASH_BEHIND = 4  # tar chunks (<= 4 MiB each) waiting for the diff_id's thread, at most


class _Stopping(Counting):
    """The checkpoint thread's view of the blob: its reads fail once the tar side has failed."""

    stopped = False

    def readinto(self, buf) -> int:
        if self.stopped:
            raise InvalidLayer("the tar scan failed")
        return super().readinto(buf)


def _checkpoints(gz, errors: list) -> None:
    """The checkpoint thread: indexed_gzip expands its index over the whole stream — one ``seek``
    past the end, which inflates without the GIL (only its reads take it) and makes no output."""
    try:
        gz.seek(1 << 62)
    except BaseException as exc:  # noqa: BLE001 - the caller decides what it means
        errors.append(exc)


def inflate_stream(f, size: int, label: str, *, estimate: int, dense: int = spans.DENSE,
                   on_member: Callable | None = None, progress: bool = True, index_stream=None) -> Pass:
    """One inflate of the ``size``-byte gzip blob read from ``f`` (a seekable binary stream at its
    start: the committed file, or the blob as it arrives). ``estimate``: the tar's size, roughly
    (it spaces the candidates).

    With ``index_stream`` (a second stream of the same blob at its start), the work is split over
    two threads: this one inflates through :mod:`zlib` for the tar scan and the diff_id, while
    indexed_gzip records the candidate checkpoints from ``index_stream`` in another. Without it,
    indexed_gzip does both (its reads re-inflate what its index expansion already inflated)."""
    head = f.read(65536)
    f.seek(0)
    first = header_length(head)
    if first < 0:
        raise InvalidLayer(f"{label} does not start with a gzip header")
    raw = Counting(f)
    ranges = spans.DataRanges()

    def member(info) -> None:
        if info.isreg():
            ranges.add(info.offset_data, info.size)
        if on_member is not None:
            on_member(info)

    every = spacing_for(estimate, dense)
    fd, name = tempfile.mkstemp(prefix="imagefs-gzidx-")
    os.close(fd)
    export = None
    side = _Stopping(index_stream) if index_stream is not None else None
    try:
        try:
            # Alone (no index_stream): 64 KiB reads, 4 MiB out per call — each read call first
            # expands the index up to where it starts (an inflate), then inflates again from the
            # point before it, so the blob is read about twice (measured: 1 MiB / 1 MiB read the
            # 419 MiB blob 4.6 times, 5.0 s; 64 KiB / 4 MiB 2.1 times, 2.4 s). The checkpoint
            # thread only expands, with 16 MiB reads: each read takes the GIL, which the tar thread
            # holds most of the time and hands over only after the 5 ms switch interval (with 1 MiB
            # reads the pass took 3.2 s on the bench layer, with 16 MiB 2.2 s).
            gz = indexed_gzip.IndexedGzipFile(fileobj=side or raw, spacing=max(every, 2 * WINDOW), window_size=WINDOW,
                                              readbuf_size=(16 << 20) if side else 64 << 10, buffer_size=4 << 20,
                                              skip_crc_check=side is not None)  # zlib checks it on the tar side
        except (indexed_gzip.ZranError, OSError, ValueError) as exc:
            raise InvalidLayer(f"{label} is not gzip: {exc}") from exc
        errors: list[BaseException] = []
        thread = None
        try:
            if side is not None:
                thread = threading.Thread(target=_checkpoints, args=(gz, errors), name="imagefs-checkpoints", daemon=True)
                thread.start()
                tar = _Inflating(raw)  # READ at a time from the stream itself: no buffer's copies
                try:
                    found, _, skipped = tarindex.scan(tarindex.Forward(tar.chunk), label,
                                                      (lambda: raw.consumed) if progress else None, on_member=member)
                    uncompressed = tar.finish() or ""
                except BaseException:
                    side.stopped = True
                    raise
                finally:
                    tar.close()
                    thread.join()
                tar_size = tar.produced
                if errors and not (uncompressed == "" and isinstance(errors[0], indexed_gzip.ZranError)):
                    raise errors[0]  # the stream inflated, yet indexed_gzip could not follow it
            else:
                tar = diffids.Hashing(gz)
                found, _, skipped = tarindex.scan(tar, label, (lambda: raw.consumed) if progress else None,
                                                  on_member=member)
                uncompressed = tar.finish() or ""
                tar_size = gz.tell()  # the whole stream, the padding after the end marker too
            gz.export_index(filename=name)  # by name: indexed_gzip refuses a file whose mode is not "w…"
        except (EOFError, indexed_gzip.ZranError, OSError, zlib.error) as exc:
            for r in (raw, side):
                if r is not None and r.error is not None:  # the blob could not be read (a digest mismatch, the registry)
                    if not (r is side and isinstance(r.error, InvalidLayer)):
                        raise r.error from None
            raise InvalidLayer(f"{label}: not a gzip'd tar we can read: {exc}") from exc
        finally:
            gz.close()
        _count(tar_size)
        export = open(name, "rb")
        candidates, at = _read_points(export, size, tar_size)
    except BaseException:
        if export is not None:
            export.close()
        raise
    finally:
        os.unlink(name)  # an open export stays readable until closed
    return Pass(size, spans.Point(first, 0, 0), found, skipped, tar_size, uncompressed, ranges, candidates, export, at)


def _read_points(export, size: int, tar_size: int) -> tuple[list[spans.Point], dict[tuple[int, int], int]]:
    """The exported points that have a window and lie inside the stream, and where each window is."""
    points, at = [], {}
    for cmp, uncmp, bits, pos in zinfo.gzidx_points(export):
        if pos >= 0 and cmp < size and uncmp < tar_size:
            points.append(spans.Point(cmp, uncmp, bits))
            at[(cmp, uncmp)] = pos
    return points, at
