"""``imagefs gc``: marks from gc.root labels and live mounts, sweeps the rest, evicts LRU layers.

The cache is filled by the real command line (``imagefs pull``, ``imagefs mount``) against the
session registry. Blobs committed in the last minute are never swept (a root is renamed into
place a moment before its label is written), so tests backdate the cache before collecting.
"""

import hashlib
import io
import json
import os
import time

import pytest
import trio

from imagefs.content import maintenance, mounts
from imagefs.content.local import LocalStore
from imagefs.descriptors import Platform
from imagefs.gc import collect, report
from imagefs.progress import PlainProgress
from imagefs.pull import pull as pull_image
from imagefs.reference import parse
from imagefs.registry.client import RegistryClient
from imagefs.units import human, parse_size
from tests.support.cachefiles import backdate
from tests.support.mounting import Mount, imagefs

AMD64 = ("--platform", "linux/amd64")
GC_ROOT_XATTR = "user.containerd.io/gc.root"


def cached(cache_dir) -> set[str]:
    d = cache_dir / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in d.iterdir()} if d.exists() else set()



def set_last_used(cache_dir, digests, when) -> None:
    for d in digests:
        p = cache_dir / "blobs" / "sha256" / d.split(":")[1]
        if p.exists():
            os.utime(p, (when, when))


def unroot(cache_dir, digest) -> None:
    """What removing an image does: its root is no longer a gc root."""
    os.removexattr(cache_dir / "blobs" / "sha256" / digest.split(":")[1], GC_ROOT_XATTR)


def pull(proxy, repo, cache_dir, platform="linux/amd64"):
    """Fill the cache in-process (``imagefs pull`` itself is tested in test_pull.py)."""
    ref = f"{proxy.host}/{repo}:v1"

    async def main():
        async with RegistryClient(parse(ref)) as client:
            return await pull_image(LocalStore(cache_dir), client, ref, platform=Platform.parse(platform),
                                    all_platforms=False, progress=PlainProgress(io.StringIO()))

    return trio.run(main)


def gc(cache_dir, *extra, cli=False):
    """``imagefs gc`` through the command line, or the same collector in-process (faster)."""
    if cli:
        done = imagefs("gc", "--cache-dir", cache_dir, *extra, check=True)
        assert done.returncode == 0
        return done.stdout
    dry_run = "--dry-run" in extra
    max_size = parse_size(extra[extra.index("--max-size") + 1]) if "--max-size" in extra else None
    out = io.StringIO()
    report(collect(LocalStore(cache_dir), dry_run=dry_run, max_size=max_size), out)
    return out.getvalue()


def orphan(cache_dir, data: bytes) -> str:
    """A verified blob no manifest and no root refers to, as a crashed or removed pull leaves."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    p = cache_dir / "blobs" / "sha256" / digest.split(":")[1]
    p.write_bytes(data)
    p.chmod(0o444)
    return digest


def stale_ingest(cache_dir, digest: str, size: int, present: int) -> str:
    ref = f"layer-{digest}"
    d = cache_dir / "ingest" / ref
    d.mkdir(parents=True)
    with open(d / "data", "wb") as f:
        f.write(os.urandom(present))
        f.truncate(size)
    (d / "state").write_text(json.dumps({"ref": ref, "digest": digest, "size": size, "started": "2024-01-01T00:00:00Z",
                                         "present": [[0, present]]}))
    return ref


def test_parse_size_and_human():
    assert parse_size("500M") == 500 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_size("123") == 123
    assert parse_size("10kb") == 10_000 and parse_size("1 MiB") == 1 << 20
    for bad in ("", "-1", "1.2.3", "5 parsecs", "M"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert human(512) == "512 B" and human(3 << 20) == "3.0 MiB" and human(1536) == "1.5 KiB"
    assert imagefs("gc", "--max-size", "lots").returncode == 2


def test_gc_without_live_mounts_sweeps_unreferenced_and_dry_run_removes_nothing(proxy, images, cache_dir):
    pull(proxy, "test/single", cache_dir)
    pull(proxy, "test/docker", cache_dir)
    single = set(images.single.blobs)
    docker = {images.docker.digest, *images.d_amd.blobs}
    assert cached(cache_dir) == single | docker
    junk = orphan(cache_dir, b"nobody refers to me")
    loose = "sha256:" + "e" * 64
    ingest = stale_ingest(cache_dir, loose, 1 << 20, 4096)
    backdate(cache_dir)

    out = gc(cache_dir, "--dry-run", cli=True)
    assert f"would remove blob {junk} " in out and f"would remove ingest {ingest}" in out
    assert "would free" in out
    assert junk in cached(cache_dir) and (cache_dir / "ingest" / ingest).exists(), "a dry run removes nothing"

    out = gc(cache_dir, cli=True)
    assert f"removed blob {junk} 19 B (unreferenced)" in out
    assert f"removed ingest {ingest}" in out
    assert cached(cache_dir) == single | docker, "everything under a gc root is kept"
    assert not (cache_dir / "ingest" / ingest).exists()
    assert "gc: removed 1 blob and 1 ingest, freed" in out

    # an image no longer rooted goes entirely; what it shares with nothing else, that is
    unroot(cache_dir, images.docker.digest)
    out = gc(cache_dir)
    assert cached(cache_dir) == single
    for d in docker:
        assert d.split(":")[1] in out
    assert f"freed {human(sum(images.docker.blobs[d].size for d in docker))}" in out
    assert "nothing to remove" in gc(cache_dir)
    assert imagefs("fsck", "--cache-dir", cache_dir).returncode == 0


def test_young_blobs_are_never_swept(proxy, images, cache_dir):
    """A root is renamed into place before its gc.root label is written: give commits a grace minute."""
    pull(proxy, "test/single", cache_dir)
    junk = orphan(cache_dir, b"just committed")
    assert "nothing to remove" in gc(cache_dir)
    backdate(cache_dir)
    assert junk.split(":")[1] in gc(cache_dir)


def test_a_live_mount_keeps_everything_it_uses(proxy, images, cache_dir, tmp_path):
    pull(proxy, "test/single", cache_dir)
    docker = {images.docker.digest, *images.d_amd.blobs}
    layer = images.d_amd.layers[-1]
    with Mount(f"{proxy.host}/test/docker:v1", tmp_path / "m", cache_dir, *AMD64) as m:
        for digest, blob in images.d_amd.blobs.items():
            (path,) = m.mountpoint.glob(f"*-{digest}")
            assert (path / "blob").read_bytes() == blob.data
        (rec,) = mounts.live_mounts(cache_dir)
        assert rec.root == images.docker.digest and rec.mountpoint == str(tmp_path / "m")
        assert rec.selected == (images.d_amd.digest,)
        # both images lose their roots; a dead mount's record lingers
        unroot(cache_dir, images.docker.digest)
        unroot(cache_dir, images.single.digest)
        stale = mounts.mounts_dir(cache_dir) / "999999.json"
        stale.write_text(json.dumps({**rec.to_json(), "pid": 999999, "root": images.single.digest}))
        backdate(cache_dir)

        out = gc(cache_dir, "--max-size", "0")
        assert cached(cache_dir) == docker, "the live mount's image stays, every blob of it"
        assert "removed mount record pid 999999" in out and not stale.exists()
        assert "still" in out and "over the size asked" in out, "a live mount's layers are never evicted"
        assert "1 live mount" in out
        # the mount still serves, from disk
        before = proxy.bytes_sent(layer.digest)
        assert m.path(f"layer-{layer.digest}", "blob").read_bytes() == layer.data
        assert proxy.bytes_sent(layer.digest) == before
    assert mounts.live_mounts(cache_dir) == [], "a clean unmount removes its record"
    backdate(cache_dir)
    gc(cache_dir)
    assert cached(cache_dir) == set(), "once unmounted, an unrooted image is garbage"


def test_max_size_evicts_least_recently_used_layers_first(proxy, images, cache_dir, tmp_path):
    pull(proxy, "test/single", cache_dir)
    pull(proxy, "test/docker", cache_dir)
    backdate(cache_dir, 7200)
    now = time.time()
    set_last_used(cache_dir, images.d_amd.blobs, now - 3000)  # docker: used longer ago
    set_last_used(cache_dir, images.single.blobs, now - 1000)
    big = images.d_amd.layers[-1]  # 200 KB, and the least recently used: evicting it alone is enough
    set_last_used(cache_dir, [big.digest], now - 4000)
    indexes = cache_dir / "indexes" / "sha256"  # layer indexes (the files of a layer), built by mounts
    indexes.mkdir(parents=True)
    (indexes / f"{big.digest[7:]}.v1").write_bytes(b"index of a referenced layer")
    (indexes / f"{'9' * 64}.v1").write_bytes(b"index of a layer nothing references")
    backdate(indexes.parent)
    total = sum(p.stat().st_size for p in (cache_dir / "blobs" / "sha256").iterdir())
    limit = total - big.size + 1
    assert "would remove" in gc(cache_dir, "--dry-run", "--max-size", str(limit))
    assert big.digest in cached(cache_dir)

    out = gc(cache_dir, "--max-size", str(limit))
    assert f"removed blob layer-{big.digest} {human(big.size)} (evicted: least recently used" in out
    assert f"removed layer index {'9' * 64}.v1" in out
    assert [p.name for p in indexes.iterdir()] == [f"{big.digest[7:]}.v1"], "a layer's index outlives its evicted blob"
    assert cached(cache_dir) == (set(images.single.blobs) | {images.docker.digest, *images.d_amd.blobs}) - {big.digest}
    # everything else goes too when asked for nothing — but only layers, and oldest first
    out = gc(cache_dir, "--max-size", "0")
    layers = [line.split()[2] for line in out.splitlines() if line.startswith("removed blob layer-")]
    docker_layers = [f"layer-{d.digest}" for d in images.d_amd.layers[:-1]]
    single_layers = [f"layer-{d.digest}" for d in images.single.layers]
    assert layers == docker_layers + single_layers
    left = cached(cache_dir)
    assert left == {images.single.digest, images.single.config.digest, images.docker.digest,
                    images.d_amd.digest, images.d_amd.config.digest}, "manifests, indexes, configs stay"
    assert imagefs("fsck", "--cache-dir", cache_dir).returncode == 0
    # an evicted layer is fetched again the first time a mount reads it
    with Mount(f"{proxy.host}/test/docker:v1", tmp_path / "m", cache_dir, *AMD64) as m:
        assert m.path(f"layer-{big.digest}", "blob").read_bytes() == big.data
    assert big.digest in cached(cache_dir)


def test_suspended_ingest_of_a_referenced_blob_is_kept_until_space_is_needed(proxy, images, cache_dir):
    pull(proxy, "test/docker", cache_dir)
    big = images.d_amd.layers[-1]
    store = LocalStore(cache_dir)
    maintenance.remove_blob(store, big.digest)  # as if its fetch had been cut off halfway
    ref = stale_ingest(cache_dir, big.digest, big.size, big.size // 2)
    junk_ref = stale_ingest(cache_dir, "sha256:" + "f" * 64, 1000, 1000)
    backdate(cache_dir)
    out = gc(cache_dir)
    assert junk_ref in out and ref not in out, "a partial blob an image needs is kept for resuming"
    assert (cache_dir / "ingest" / ref).exists()
    out = gc(cache_dir, "--max-size", "1")
    assert f"removed ingest {ref}" in out and "evicted: partial fetch" in out
    assert not (cache_dir / "ingest" / ref).exists()


def test_ingest_held_by_a_live_process_is_kept(proxy, images, cache_dir):
    from imagefs.content import filelock

    pull(proxy, "test/single", cache_dir)
    ref = stale_ingest(cache_dir, "sha256:" + "a" * 64, 100, 10)
    held_open = stale_ingest(cache_dir, "sha256:" + "b" * 64, 100, 10)
    backdate(cache_dir)
    lock = filelock.try_lock(cache_dir, ref)
    fd = os.open(cache_dir / "ingest" / held_open / "data", os.O_RDONLY)
    try:
        out = gc(cache_dir)
        assert ref not in out and held_open not in out
    finally:
        lock.close()
        os.close(fd)
    out = gc(cache_dir)
    assert ref in out and held_open in out


def test_no_cache_and_env_var(tmp_path, monkeypatch):
    env_cache = tmp_path / "env-cache"
    done = imagefs("gc", "--cache-dir", tmp_path / "missing", check=True)
    assert "nothing to do" in done.stdout
    monkeypatch.setenv("IMAGEFS_CACHE_DIR", str(env_cache))
    done = imagefs("gc")
    assert str(env_cache) in done.stdout and done.returncode == 0
