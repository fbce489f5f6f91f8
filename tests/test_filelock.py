"""The cross-process ref lock (imagefs/content/filelock.py), between real processes.

A second process is what the lock is for, so each test starts one (a plain ``python -c``) that
takes a lock and waits on stdin; the test process then contends with it.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from imagefs.content import filelock
from imagefs.errors import Unavailable

REF = "layer-sha256:" + "ab" * 32

HOLDER = textwrap.dedent("""
    import sys
    from imagefs.content import filelock
    lock = filelock.try_lock(sys.argv[1], sys.argv[2])
    print("locked" if lock else "busy", flush=True)
    sys.stdin.readline()
    if lock:
        lock.close()
    print("released", flush=True)
    sys.stdin.readline()
""")


class Holder:
    """A second process holding (or trying to hold) a lock until told to let go."""

    def __init__(self, root, ref=REF):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), ref], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.first = self.proc.stdout.readline().strip()

    def release(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holder(tmp_path):
    h = Holder(tmp_path)
    yield h
    h.close()


def test_second_process_is_refused_and_told_who_holds_it(tmp_path, holder):
    assert holder.first == "locked"
    time.sleep(0.2)
    assert filelock.try_lock(tmp_path, REF) is None
    h = filelock.holder(tmp_path, REF)
    assert h is not None and h.pid == holder.proc.pid
    message = str(filelock.unavailable(tmp_path, REF))
    assert message.startswith(f"ref {REF} locked by pid {holder.proc.pid} for ")
    seconds = float(message.rsplit("for ", 1)[1].rstrip("s"))
    assert 0.2 <= seconds < 30
    assert isinstance(filelock.unavailable(tmp_path, REF), Unavailable)


def test_released_on_close_then_the_other_process_gets_it(tmp_path, holder):
    assert filelock.try_lock(tmp_path, REF) is None
    holder.release()
    lock = filelock.try_lock(tmp_path, REF)
    assert lock is not None
    # while we hold it, a new process is refused
    other = Holder(tmp_path)
    try:
        assert other.first == "busy"
    finally:
        other.close()
    lock.close()
    assert not filelock.lock_path(tmp_path, REF).exists(), "released locks leave no file"


def test_released_when_the_holder_is_killed(tmp_path, holder):
    assert holder.first == "locked"
    os.kill(holder.proc.pid, signal.SIGKILL)
    holder.proc.wait()
    # the file stays behind, the lock does not
    assert filelock.lock_path(tmp_path, REF).exists()
    assert filelock.holder(tmp_path, REF) is None
    with filelock.try_lock(tmp_path, REF) as lock:
        assert lock is not None and lock.held


def test_same_process_second_try_and_other_refs(tmp_path):
    a = filelock.try_lock(tmp_path, REF)
    assert a is not None
    assert filelock.try_lock(tmp_path, REF) is None, "one holder even within a process"
    b = filelock.try_lock(tmp_path, "config-sha256:" + "cd" * 32)
    assert b is not None, "refs lock independently"
    a.close()
    b.close()
    with pytest.raises(ValueError):
        filelock.try_lock(tmp_path, "../escape")


def test_many_processes_race_exactly_one_wins_each_round(tmp_path):
    """Lock files are unlinked on release: the inode check keeps a racer from locking a dead file."""
    script = textwrap.dedent("""
        import os, sys, time
        from imagefs.content import filelock
        wins = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            lock = filelock.try_lock(sys.argv[1], sys.argv[2])
            if lock:
                path = filelock.lock_path(sys.argv[1], sys.argv[2])
                marker = path.with_suffix(".owner")
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL)
                except FileExistsError:
                    print("DOUBLE", flush=True); sys.exit(1)
                os.close(fd)
                time.sleep(0.001)
                marker.unlink()
                lock.close()
                wins += 1
        print(wins, flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), REF], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert "DOUBLE" not in outs, outs
    assert sum(int(o) for o in outs) > 10, outs
