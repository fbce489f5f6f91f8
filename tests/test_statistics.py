"""``user.imagefs.statistics`` through real mounts: one JSON object, one key per part, and the
counters move as a cold read and a warm remount say they must."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess

import pytest

from tests.support.mounting import Mount
from tests.test_mount import ref_key, wait_for
from tests.test_registry_transport import DATA, Blobs, answer, layer, mock_client, read

AMD64 = ("--platform", "linux/amd64")
PARTS = {"reader", "store", "registry", "layers"}


def statistics(mountpoint) -> dict:
    """The xattr as a user reads it: ``getfattr`` on the mount root."""
    out = subprocess.run(["getfattr", "--only-values", "--absolute-names", "-n", "user.imagefs.statistics", str(mountpoint)],
                         capture_output=True, check=True).stdout
    return json.loads(out)


def test_statistics_move_with_a_cold_read_and_stay_still_on_a_warm_remount(proxy, images, tmp_path, cache_dir):
    shared = images.shared
    committed = cache_dir / "blobs" / "sha256" / shared.digest.split(":")[1]
    with Mount(f"{proxy.host}/test/oci:v1", tmp_path / "cold", cache_dir, *AMD64) as m:
        before = statistics(m.mountpoint)
        assert PARTS <= before.keys()
        assert before["reads"] == before["reader"]["reads"] and "passthrough_opens" in before  # the reader's keys stay
        assert before["passthrough"] == before["reader"]["passthrough"] == 0, "no part hides a reader key"
        assert before["registry"]["requests"] >= 2, "resolve and the mount's manifests went to the registry"
        data = m.path(ref_key(shared), "blob").read_bytes()
        assert hashlib.sha256(data).hexdigest() == shared.digest.split(":")[1]
        assert m.path("rootfs", "etc", "arch").read_bytes() == b"amd64\n"
        assert wait_for(committed.exists)
        after = statistics(m.mountpoint)
        registry, store, reader, layers = after["registry"], after["store"], after["reader"], after["layers"]
        assert registry["bytes_received"] - before["registry"]["bytes_received"] >= len(data)
        assert registry["requests"] > before["registry"]["requests"]
        assert reader["bytes_served"] >= len(data)
        assert reader["bytes_fetched"] <= registry["bytes_received"], "the reader's bytes came through the client"
        assert store["blobs_committed"] >= 1 and store["bytes_committed"] >= shared.size
        assert store["verify_failures"] == 0
        assert layers["indexes_built"] + layers["indexes_loaded"] >= 3, "rootfs/ indexed the platform's layers"
        assert layers["bytes_inflated"] >= len(b"amd64\n")

    proxy.reset()
    with Mount(f"{proxy.host}/test/oci@{images.oci.digest}", tmp_path / "warm", cache_dir, *AMD64) as m:
        assert m.path(ref_key(shared), "blob").read_bytes() == data
        assert m.path("rootfs", "etc", "arch").read_bytes() == b"amd64\n"
        warm = statistics(m.mountpoint)
        assert warm["registry"]["requests"] == 0 and warm["registry"]["bytes_received"] == 0
        assert warm["store"]["hits"] >= 1, "the mount's manifests were found committed"
        assert warm["store"]["blobs_committed"] == 0
        assert warm["layers"]["indexes_built"] == 0 and warm["layers"]["indexes_loaded"] >= 1
        if "fuse_passthrough" in warm and warm["fuse_passthrough"]["enabled"]:  # root on Linux >= 6.9
            assert warm["fuse_passthrough"]["opens"] == warm["passthrough_opens"] >= 1
    assert proxy.matching("/v2/") == [], "a warm remount by digest asked nothing of the registry"


async def test_registry_statistics_count_requests_retries_and_bytes(autojump_clock):
    """The transport's record, in process: a 503 then a cut body cost two retries and three requests,
    and the bytes counted are the ones handed over, each once."""
    blobs = Blobs(DATA)
    blobs.script = [answer(503)]
    blobs.cuts = [4000]
    async with mock_client(blobs) as client:
        assert client.statistics().requests == 0
        assert await read(client, layer(DATA)) == DATA
        stats = client.statistics()
        assert (stats.requests, stats.retries, stats.bytes_received) == (3, 2, len(DATA))
        assert stats.direct_requests == stats.direct_bytes == stats.fallbacks == 0
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.requests = 0  # type: ignore[misc]
        assert client.statistics() == stats, "a snapshot: reading it moves nothing"

