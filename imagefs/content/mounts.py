"""Live mounts, registered in the cache: the leases of imagefs.

A mount writes ``CACHE/mounts/<pid>.json`` (pid, ref, mount point, root digest, selected manifests,
start time) before it serves, and removes it when it ends cleanly. Everything reachable from a
live mount's root is leased, as containerd's leases protect content in use: ``gc`` never sweeps it
and ``gc --max-size`` never evicts it. A record whose process is gone (``kill -9``, a crash, a
reboot) is stale; the pid's start time and the boot id tell a reused pid from the original.
``gc`` and ``ls`` skip stale records and remove them.

Entering and leaving a mount also marks everything reachable from its root as used now (see
:func:`imagefs.content.maintenance.touch`), which is what least-recently-used eviction orders by.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from . import layout, maintenance
from .labels import now_rfc3339
from .local import LocalStore

if TYPE_CHECKING:
    from ..image import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountRecord:
    pid: int
    ref: str
    mountpoint: str
    root: str
    root_media_type: str
    selected: tuple[str, ...] = ()
    started: str = ""
    proc_start: int | None = None
    boot_id: str | None = None
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc.pop("path")
        doc["selected"] = list(self.selected)
        return doc

    @classmethod
    def from_json(cls, doc: dict, path: Path | None = None) -> "MountRecord":
        return cls(
            pid=int(doc["pid"]),
            ref=str(doc["ref"]),
            mountpoint=str(doc["mountpoint"]),
            root=str(doc["root"]),
            root_media_type=str(doc.get("root_media_type", "")),
            selected=tuple(str(s) for s in doc.get("selected", ())),
            started=str(doc.get("started", "")),
            proc_start=doc.get("proc_start") if isinstance(doc.get("proc_start"), int) else None,
            boot_id=doc.get("boot_id") if isinstance(doc.get("boot_id"), str) else None,
            path=path,
        )


def mounts_dir(store_root: Path) -> Path:
    return layout.mounts(store_root)


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its closing paren.
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def alive(record: MountRecord) -> bool:
    """Whether the process that wrote ``record`` still runs (and is not a later one with its pid)."""
    boot = _boot_id()
    if record.boot_id and boot and record.boot_id != boot:
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if record.proc_start is not None:
        now = _proc_start(record.pid)
        if now is not None and now != record.proc_start:
            return False
    return True


def register(store_root: Path, *, ref: str, mountpoint: Path, root_digest: str, root_media_type: str,
             selected: list[str] | tuple[str, ...] = ()) -> MountRecord:
    """Write this process's mount record; atomically, so a reader never sees half of it."""
    pid = os.getpid()
    record = MountRecord(
        pid=pid, ref=ref, mountpoint=str(mountpoint), root=root_digest, root_media_type=root_media_type,
        selected=tuple(selected), started=now_rfc3339(), proc_start=_proc_start(pid), boot_id=_boot_id(),
        path=layout.mount_record(store_root, pid),
    )
    assert record.path is not None
    record.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.path.with_name(f".{record.path.name}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    os.replace(tmp, record.path)
    return record


def unregister(record: MountRecord) -> None:
    if record.path is not None:
        try:
            record.path.unlink()
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class Records:
    live: list[MountRecord]
    stale: list[MountRecord]
    unreadable: list[Path]


def scan(store_root: Path) -> Records:
    """Every mount record, sorted into live, stale and unreadable."""
    live, stale, bad = [], [], []
    d = mounts_dir(store_root)
    if not d.is_dir():
        return Records([], [], [])
    for p in sorted(d.glob("*.json")):
        try:
            rec = MountRecord.from_json(json.loads(p.read_text()), p)
        except (OSError, ValueError, KeyError, TypeError):
            bad.append(p)
            continue
        (live if alive(rec) else stale).append(rec)
    return Records(live, stale, bad)


def live_mounts(store_root: Path, *, clean: bool = True) -> list[MountRecord]:
    """The live mounts of a cache; with ``clean``, stale records are removed on the way."""
    records = scan(store_root)
    if clean:
        for rec in records.stale:
            unregister(rec)
    return records.live


@asynccontextmanager
async def registered(store: LocalStore, ref: str, mountpoint: Path, image: "Image") -> AsyncIterator[MountRecord | None]:
    """Hold a lease on ``image`` while the block runs (the serving part of a mount).

    Registration is best effort: a cache on a full disk must not stop a mount from serving what
    it already holds; the root's ``gc.root`` label still protects the image then.
    """
    root = image.root
    record: MountRecord | None = None
    try:
        record = register(store.root, ref=ref, mountpoint=mountpoint, root_digest=root.digest,
                          root_media_type=root.media_type, selected=[d.digest for d in image.selected])
    except OSError as exc:
        log.warning("cannot register the mount in %s: %s", mounts_dir(store.root), exc)
    _touch_reachable(store, root.digest)
    try:
        yield record
    finally:
        _touch_reachable(store, root.digest)
        if record is not None:
            unregister(record)


def _touch_reachable(store: LocalStore, root: str) -> None:
    try:
        maintenance.touch(store, maintenance.walk(store, [root]).reached)
    except OSError as exc:
        log.debug("cannot mark %s as used: %s", root, exc)
