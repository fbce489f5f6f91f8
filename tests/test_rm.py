"""``imagefs rm``: an image forgotten (gc root label and remembered tag), then ``imagefs gc`` takes
what only it used and keeps what another image, or a live mount, still references. Everything runs
through the real command line against the session registry."""

from imagefs.testing import images as im
from imagefs.testing.push import push
from tests.support.cachefiles import backdate
from tests.support.mounting import Mount, imagefs


def cached(cache_dir) -> set[str]:
    return {f"sha256:{p.name}" for p in (cache_dir / "blobs" / "sha256").iterdir()}



def test_rm_then_gc_removes_the_image_and_keeps_what_another_shares(registry, images, cache_dir):
    other = im.image([images.shared, im.tar_layer({"etc/other": b"other\n"})])
    push(registry.host, "test/rm-other", other, "v1")
    for repo in ("test/oci", "test/rm-other"):
        imagefs("pull", f"{registry.host}/{repo}:v1", "--all-platforms", "--cache-dir", cache_dir, check=True)
    mine = set(images.oci.blobs) - set(other.blobs) - {im.EMPTY_JSON.digest}  # the artifact's: pull leaves it
    assert mine <= cached(cache_dir) and set(other.blobs) <= cached(cache_dir)
    tag_file = cache_dir / "refs" / registry.host / "test" / "oci" / "v1.json"
    assert tag_file.exists()

    done = imagefs("rm", f"{registry.host}/test/oci:v1", "--cache-dir", cache_dir, check=True)
    assert images.oci.digest in done.stdout
    assert not tag_file.exists()
    backdate(cache_dir)
    imagefs("gc", "--cache-dir", cache_dir, check=True)
    left = cached(cache_dir)
    assert not (mine & left), "every blob only test/oci used is gone"
    assert set(other.blobs) <= left, "the other image, and the layer it shares, stay"
    assert images.shared.digest in left


def test_rm_by_digest_and_a_second_tag_of_the_same_root(registry, images, cache_dir):
    imagefs("pull", f"{registry.host}/test/single:v1", "--cache-dir", cache_dir, check=True)
    push(registry.host, "test/single", images.single, "v2")
    imagefs("pull", f"{registry.host}/test/single:v2", "--cache-dir", cache_dir, check=True)

    done = imagefs("rm", f"{registry.host}/test/single:v1", "--cache-dir", cache_dir, check=True)
    assert "still kept as" in done.stdout and "test/single:v2" in done.stdout
    backdate(cache_dir)
    imagefs("gc", "--cache-dir", cache_dir, check=True)
    assert set(images.single.blobs) <= cached(cache_dir), "v2 names the same root: nothing goes"

    imagefs("rm", f"{registry.host}/test/single@{images.single.digest}", "--cache-dir", cache_dir, check=True)
    imagefs("gc", "--cache-dir", cache_dir, check=True)
    assert not set(images.single.blobs) & cached(cache_dir)
    assert not list((cache_dir / "refs").rglob("*.json"))


def test_a_live_mount_keeps_its_image_until_unmounted(registry, images, cache_dir, tmp_path):
    ref = f"{registry.host}/test/single:v1"
    with Mount(ref, tmp_path / "m", cache_dir) as m:
        layer = images.single.layers[0]
        assert m.path(f"layer-{layer.digest}", "blob").read_bytes() == layer.data
        held = cached(cache_dir)
        assert images.single.digest in held
        done = imagefs("rm", ref, "--cache-dir", cache_dir, check=True)
        assert f"still mounted at {m.mountpoint}" in done.stdout
        backdate(cache_dir)
        imagefs("gc", "--cache-dir", cache_dir, check=True)
        assert held <= cached(cache_dir), "the mount's lease keeps it"
    backdate(cache_dir)
    imagefs("gc", "--cache-dir", cache_dir, check=True)
    assert not set(images.single.blobs) & cached(cache_dir)


def test_rm_of_an_image_not_in_the_cache_is_one_line_and_exit_1(registry, images, cache_dir):
    imagefs("pull", f"{registry.host}/test/single:v1", "--cache-dir", cache_dir, check=True)
    done = imagefs("rm", f"{registry.host}/test/nothing:v9", f"{registry.host}/test/single:v1", "--cache-dir", cache_dir)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "test/nothing:v9: not in the cache" in done.stderr
    assert "forgot" in done.stdout, "the other REF is still forgotten"
