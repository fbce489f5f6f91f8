"""Issue 3 end to end: ranged lazy reads through a real mount, counted at the registry's door."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.mounting import Mount, running
from tests.test_mount import assert_disjoint_ranges, ref_key, wait_for

SPAN = 64 * 1024  # small spans: many boundaries inside a 12 MiB test layer
AMD64 = ("--platform", "linux/amd64", "--span-size", str(SPAN))


def blob_path(m, blob):
    return m.path(ref_key(blob), "blob")


def test_random_reads_equal_the_true_bytes(proxy, images, mnt, cache_dir):
    shared = images.shared
    data, size = shared.data, shared.size
    boundary = st.integers(1, size // SPAN).map(lambda k: k * SPAN)
    offsets = st.one_of(st.integers(0, size - 1), boundary.map(lambda b: b - 1), boundary, st.just(size - 1),
                        st.integers(size - 3 * SPAN, size))
    lengths = st.one_of(st.integers(1, 3 * SPAN), st.sampled_from([1, 4096, SPAN, SPAN + 1, 131072]))
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        fd = os.open(blob_path(m, shared), os.O_RDONLY)
        try:
            @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(offsets, lengths)
            def check(off, n):
                assert os.pread(fd, n, off) == data[off : off + n]

            check()
            assert os.pread(fd, 10, size) == b""
        finally:
            os.close(fd)
        # laziness: the registry sent what was read (plus spans and small readahead), never a byte twice
        assert_no_byte_twice(proxy.gets(shared.digest), size)


def assert_no_byte_twice(hits, size):
    spans = sorted(
        tuple(int(x) for x in h.request_headers["range"].split("=")[1].split("-")) if "range" in h.request_headers else (0, size - 1)
        for h in hits
    )
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), f"a byte was requested twice: {spans}"


def test_random_reads_fetch_about_a_span_each(proxy, images, mnt, cache_dir):
    shared = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        offsets = [3 * SPAN + 100, 57 * SPAN + 9, 120 * SPAN, 170 * SPAN + 4000]
        for off in offsets:  # like dd skip=… count=1: a fresh open per read
            with open(blob_path(m, shared), "rb", buffering=0) as f:
                f.seek(off)
                assert f.read(4096) == shared.data[off : off + 4096]
        sent = proxy.bytes_sent(shared.digest)
        # a span, or two where the read (or the kernel's small initial readahead) crosses a boundary
        assert len(offsets) * 4096 <= sent <= len(offsets) * 2 * SPAN, sent
        assert sent < shared.size // 20


def recorded(state_file) -> int:
    """Bytes an ingest's state file says are present."""
    try:
        return sum(b - a for a, b in json.loads(state_file.read_text())["present"])
    except (OSError, ValueError):
        return 0


def test_interrupted_mount_is_resumed_fetching_only_the_rest(proxy, images, tmp_path, cache_dir):
    shared = images.shared
    first, second = tmp_path / "m1", tmp_path / "m2"
    state_file = cache_dir / "ingest" / ref_key(shared) / "state"
    # Every response is cut after 4 MiB, and once the first bytes are read every new request
    # stalls: the blob cannot complete before the kill, however fast the reader fetches.
    proxy.cut(shared.digest, after=4 << 20)
    m = Mount(f"{proxy.host}/test/oci:v1", first, cache_dir, *AMD64).__enter__()
    try:
        with open(blob_path(m, shared), "rb") as f:
            f.read(3 << 20)  # a sequential start: a few windows land
            proxy.delay(rf"/blobs/{shared.digest}", 60, method="GET")
        # landed bytes are recorded within RECORD_INTERVAL, even while their request is stalled
        assert wait_for(lambda: recorded(state_file) >= 3 << 20, timeout=5), recorded(state_file)
        # interrupt it the hard way: the process dies, the kernel mount is left dangling
        os.kill(m.server[0], signal.SIGKILL)
        assert wait_for(lambda: not running(m.server))  # a zombie is dead enough: its files are closed
    finally:
        subprocess.run(["fusermount3", "-uz", str(first)], capture_output=True)
    kept = recorded(state_file)
    assert kept >= 3 << 20, "what had landed was recorded"
    assert kept < shared.size
    proxy.clear_faults()
    before = proxy.bytes_sent(shared.digest)
    with Mount(f"{proxy.host}/test/oci:v1", second, cache_dir, *AMD64) as m2:
        got = blob_path(m2, shared).read_bytes()
        assert got == shared.data
        assert proxy.bytes_sent(shared.digest) - before == shared.size - kept
        assert "resuming with" in m2.log_text()


def test_64_concurrent_cold_readers_cost_one_blob(proxy, images, mnt, cache_dir):
    shared = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        path = str(blob_path(m, shared))
        with ThreadPoolExecutor(64) as pool:
            outs = list(pool.map(lambda _: subprocess.run(["sha256sum", path], capture_output=True, text=True).stdout.split()[0],
                                 range(64)))
        assert set(outs) == {shared.digest.split(":")[1]}
        assert proxy.bytes_sent(shared.digest) == shared.size
        assert_disjoint_ranges(proxy.gets(shared.digest), shared.size)


def test_strict_never_serves_unverified_bytes(proxy, images, tmp_path, cache_dir):
    shared = images.shared
    proxy.corrupt(shared.digest, offset=shared.size - 1)  # only the last byte is wrong
    lax, strict = tmp_path / "lax", tmp_path / "strict"
    with Mount(f"{proxy.host}/test/oci:v1", lax, tmp_path / "c1", *AMD64) as m:
        with open(blob_path(m, shared), "rb") as f:
            assert f.read(4096) == shared.data[:4096], "without --strict the head is served as it lands"
    with Mount(f"{proxy.host}/test/oci:v1", strict, cache_dir, *AMD64, "--strict") as m:
        done = subprocess.run(["head", "-c", "4096", str(blob_path(m, shared))], capture_output=True)
        assert done.returncode != 0 and done.stdout == b"" and b"Input/output error" in done.stderr
        assert not (cache_dir / "blobs" / "sha256" / shared.digest.split(":")[1]).exists()
        proxy.clear_faults()
        assert blob_path(m, shared).read_bytes() == shared.data  # a new open fetches again


def test_corrupted_range_is_detected_at_completion(proxy, images, mnt, cache_dir):
    shared = images.shared
    bad = 100 * SPAN + 17
    proxy.corrupt(shared.digest, offset=bad)
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        done = subprocess.run(["cat", str(blob_path(m, shared))], capture_output=True)
        assert done.returncode != 0 and b"Input/output error" in done.stderr
        assert not (cache_dir / "blobs" / "sha256" / shared.digest.split(":")[1]).exists()
        assert "content has digest" in m.log_text()
        # the mount lives on: other blobs read fine
        other = images.amd.layers[0]
        assert blob_path(m, other).read_bytes() == other.data


def test_prefetch_completes_the_selected_layers_without_a_reader(proxy, images, mnt, cache_dir):
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--prefetch") as m:
        # the line comes after the last commit (rename, then its own log line): wait for it, not for the files
        assert wait_for(lambda: "prefetch complete: 3 layers" in m.log_text(), timeout=30), m.log_text()
        for layer in images.amd.layers:
            assert (cache_dir / "blobs" / "sha256" / layer.digest.split(":")[1]).exists()
            assert proxy.bytes_sent(layer.digest) == layer.size
        # the other platform's own layer was not fetched
        arm_only = images.arm.layers[-1]
        assert proxy.bytes_sent(arm_only.digest) == 0
