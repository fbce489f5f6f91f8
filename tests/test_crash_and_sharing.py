"""Issue 6: the store survives kill -9 at random moments, and two processes share one cache."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from tests.support.mounting import Mount, running
from tests.test_mount import ref_key, wait_for

AMD64 = ("--platform", "linux/amd64", "--span-size", str(256 * 1024))


def assert_store_consistent(cache_dir) -> None:
    """Every committed blob hashes to its name; every ingest has a readable state."""
    blobs = cache_dir / "blobs" / "sha256"
    for f in blobs.iterdir() if blobs.exists() else ():
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name, f"committed blob {f.name} is corrupt"
    ingest = cache_dir / "ingest"
    for d in ingest.iterdir() if ingest.exists() else ():
        state = json.loads((d / "state").read_text())
        assert state["ref"] == d.name
        assert (d / "data").stat().st_size == state["size"]


def test_kill_9_at_random_moments_never_corrupts_the_store(proxy, images, tmp_path, cache_dir):
    layers = [images.shared, *images.amd.layers[:1], images.amd.layers[-1]]
    proxy.delay(r"/blobs/", 0.05)  # fetches take long enough to be caught mid-flight
    rng = random.Random(20)
    for i in range(20):
        mnt = tmp_path / f"m{i}"
        m = Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64).__enter__()
        readers = []
        try:
            server = m.server  # (pid, start time) of the mount's background process
            for layer in layers:
                readers.append(subprocess.Popen(["cat", str(m.path(ref_key(layer), "blob"))],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(server[0], signal.SIGKILL)
            # dead once it is a zombie: its files are closed; only init reaps it, when it gets to it
            assert wait_for(lambda: not running(server))
        finally:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            for r in readers:
                r.kill()
                r.wait()
        assert_store_consistent(cache_dir)
    proxy.clear_faults()
    # the next mount continues where the killed ones stopped, and every byte is right
    with Mount(f"{proxy.host}/test/oci:v1", tmp_path / "final", cache_dir, *AMD64) as m:
        for layer in layers:
            assert m.path(ref_key(layer), "blob").read_bytes() == layer.data
    assert_store_consistent(cache_dir)


def test_two_processes_sharing_a_cache_never_double_commit(proxy, images, tmp_path, cache_dir):
    shared, small = images.shared, images.amd.layers[-1]
    proxy.delay(r"/blobs/", 0.02)
    with Mount(f"{proxy.host}/test/oci:v1", tmp_path / "a", cache_dir, *AMD64) as a, \
         Mount(f"{proxy.host}/test/oci:v1", tmp_path / "b", cache_dir, *AMD64) as b:
        paths = [m.path(ref_key(layer), "blob") for m in (a, b) for layer in (shared, small)] * 3
        with ThreadPoolExecutor(len(paths)) as pool:
            sums = list(pool.map(lambda p: subprocess.run(["sha256sum", str(p)], capture_output=True, text=True).stdout.split()[0], paths))
        assert sums == [layer.digest.split(":")[1] for _ in range(2) for layer in (shared, small)] * 3
        assert wait_for(lambda: (cache_dir / "blobs" / "sha256" / shared.digest.split(":")[1]).exists())
    # read after both servers exited: readers are served once a blob verifies, and its commit
    # (fsync, rename, then the "committed" line) follows, so the lines may lag the reads
    logs = a.log_text() + b.log_text()
    for layer in (shared, small):
        assert logs.count(f"committed {ref_key(layer)}") == 1, "exactly one process committed it"
    assert_store_consistent(cache_dir)
    assert not any((cache_dir / "ingest").iterdir())
    # one process wrote each blob; the other read around it or waited, so the registry sent at most twice
    assert proxy.bytes_sent(shared.digest) <= 2 * shared.size
