"""Hostile manifests and indexes: a clear error or a sensible view, never a crash, hang or blow-up.

Three tiers, the same hostile inputs throughout:

1. :func:`imagefs.descriptors.children` on arbitrary JSON and bytes (hundreds of examples);
2. a whole graph in-process — :class:`Image` and the :class:`Tree` a mount shows, walked as
   ``ls -R`` walks it — over an in-memory registry that serves whatever the example says;
3. real mounts (``imagefs mount`` through the proxy, which answers with the hostile bytes), a
   couple of dozen examples, since each costs a process and a FUSE mount.

Inputs: invalid JSON, wrong or missing ``mediaType``, digests that do not match the bytes, negative
or absurd sizes, manifests over 4 MiB, an index that names its own digest or a cycle through a
registry's lies, duplicate children, unknown fields and media types, non-sha256 digests, nested
indexes, missing blobs. Crashes found this way are kept as regression tests at the end (they were ``xfail`` while
unfixed) and kept out of the strategies while they are open, so the fuzzing looks for new ones.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from imagefs import descriptors as d
from imagefs.content import mounts
from imagefs.content.local import LocalStore
from imagefs.descriptors import Descriptor, Platform, children, has_children
from imagefs.errors import ImagefsError, InvalidManifest, NotFound
from imagefs.fs.tree import Tree
from imagefs.image import Image
from tests.support.mounting import imagefs

HOST = Platform("linux", "amd64")
MAX = d.MAX_MANIFEST_SIZE
WEIRD_TYPES = ["application/x-unknown+json", "", "text/plain", d.DOCKER_SCHEMA1, d.DOCKER_SCHEMA1_SIGNED,
               d.OCI_CONFIG, d.OCI_LAYER_GZIP]
ALL_TYPES = [d.OCI_MANIFEST, d.OCI_INDEX, d.DOCKER_MANIFEST, d.DOCKER_MANIFEST_LIST, *WEIRD_TYPES]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- tier 1: children() -------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                          max_leaves=25)
digest_ish = st.sampled_from(["sha256:" + "a" * 64, "sha512:" + "b" * 128, "SHA256:" + "C" * 64, "sha256:abc",
                              "sha256:../../etc/passwd", "sha256:" + "d" * 64 + "\n", ""]) | json_leaf
descriptor_ish = st.fixed_dictionaries({}, optional={
    "mediaType": st.sampled_from(ALL_TYPES) | json_leaf,
    "digest": digest_ish,
    "size": st.sampled_from([0, 5, -1, 2**49, 2**63, 1.5, True, "12"]) | json_leaf,
    "platform": st.fixed_dictionaries({}, optional={"os": st.sampled_from(["linux", "windows"]) | json_leaf,
                                                    "architecture": st.sampled_from(["amd64", "arm64"]) | json_leaf,
                                                    "variant": json_leaf}) | json_leaf,
    "urls": json_value, "annotations": json_value, "x-unknown": json_value,
})
document_ish = st.fixed_dictionaries({}, optional={
    "schemaVersion": st.sampled_from([2, 1, "2"]) | json_leaf,
    "mediaType": st.sampled_from(ALL_TYPES) | json_leaf,
    "manifests": st.lists(descriptor_ish, max_size=5) | json_value,
    "config": descriptor_ish | json_value,
    "layers": st.lists(descriptor_ish, max_size=5) | json_value,
    "annotations": json_value, "subject": descriptor_ish, "x-unknown": json_value,
})
bodies = (document_ish.map(lambda doc: json.dumps(doc).encode())
          | json_value.map(lambda v: json.dumps(v).encode())
          | st.binary(max_size=200)
          | document_ish.map(lambda doc: json.dumps(doc).encode()[: len(json.dumps(doc)) // 2]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(media_type=st.sampled_from(ALL_TYPES), body=bodies)
def test_children_gives_descriptors_or_invalid_manifest(media_type, body):
    desc = Descriptor(media_type, sha(body), len(body))
    try:
        kids = children(desc, body)
    except InvalidManifest as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    if not has_children(desc):
        assert kids == []
    for kid in kids:
        assert re.fullmatch(r"sha256:[a-f0-9]{64}", kid.digest)
        assert isinstance(kid.size, int) and 0 <= kid.size <= 1 << 50
        assert isinstance(kid.media_type, str) and kid.media_type
        assert kid.ref_key.split("-", 1)[0] in ("manifest", "index", "layer", "config", "unknown")


# -- scenarios: a small registry of hostile documents ------------------------------------------------


@dataclass
class Scenario:
    """What a hostile registry serves: the root descriptor (as its HEAD answer says) and bytes by digest."""

    root: Descriptor
    blobs: dict[str, bytes]
    content_types: dict[str, str] = field(default_factory=dict)
    mutations: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Scenario({self.root.media_type}, {self.root.digest[:19]}…, size={self.root.size}, {self.mutations})"


MUTATIONS = ["unknown_fields", "missing_media_type", "wrong_media_type", "child_media_type", "bad_digest",
             "bad_size", "size_mismatch", "duplicates", "oversize", "nested_index", "invalid_json",
             "digest_lie", "self_reference", "cycle", "missing_blob", "weird_platform"]


@st.composite
def scenarios(draw) -> Scenario:
    """An honest image graph, then 1–3 mutations: some made before hashing (the registry is honest
    about hostile content), some after (the registry lies about digests)."""
    rnd = draw(st.randoms(use_true_random=False))
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3, unique=True))
    docker = draw(st.booleans())
    m_type = d.DOCKER_MANIFEST if docker else d.OCI_MANIFEST
    i_type = d.DOCKER_MANIFEST_LIST if docker else d.OCI_INDEX
    blobs: dict[str, bytes] = {}
    types: dict[str, str] = {}

    def put(data: bytes, media_type: str) -> dict:
        blobs[sha(data)] = data
        types[sha(data)] = media_type
        return {"mediaType": media_type, "digest": sha(data), "size": len(data)}

    platforms = [{"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64", "variant": "v8"},
                 {"os": "windows", "architecture": "amd64"}]
    n = draw(st.integers(1, 3))
    manifests = []
    for i in range(n):
        config = put(json.dumps({"architecture": platforms[i]["architecture"], "os": platforms[i]["os"]}).encode(), d.OCI_CONFIG)
        layers = [put(rnd.randbytes(rnd.randrange(1, 300)), d.OCI_LAYER_GZIP) for _ in range(draw(st.integers(0, 2)))]
        manifests.append(({"schemaVersion": 2, "mediaType": m_type, "config": config, "layers": layers}, platforms[i]))

    def mutate_doc(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        kids = doc.get("manifests") or ([doc["config"]] + doc["layers"] if "config" in doc else [])
        kid = rnd.choice(kids) if kids else None
        if "unknown_fields" in mutations:
            doc["x-" + str(rnd.randrange(100))] = {"nested": [1, None, "x"]}
            if kid is not None:
                kid["x-extra"] = rnd.choice([0, "s", [1], {"a": None}])
        if "missing_media_type" in mutations and rnd.random() < 0.7:
            doc.pop("mediaType", None)
        if "wrong_media_type" in mutations and rnd.random() < 0.5:
            doc["mediaType"] = rnd.choice([i_type if doc.get("mediaType") == m_type else m_type, *WEIRD_TYPES])
        if kid is not None:
            if "child_media_type" in mutations:
                kid["mediaType"] = rnd.choice([m_type, i_type, *WEIRD_TYPES])
            if "bad_digest" in mutations:
                kid["digest"] = rnd.choice(["sha512:" + "b" * 128, kid["digest"].upper(), "sha256:abc",
                                            "sha256:../../x", 42, None, kid["digest"] + "0"])
            if "bad_size" in mutations:
                kid["size"] = rnd.choice([-1, 1.5, True, "12", None, 2**40, 2**49, 2**50 + 1])
            if "size_mismatch" in mutations and isinstance(kid.get("size"), int):
                kid["size"] = max(kid["size"] + rnd.choice([-1, 1, 1000]), 0)
            if "duplicates" in mutations:
                kids_list = doc.get("manifests") if "manifests" in doc else doc.get("layers")
                if isinstance(kids_list, list):
                    kids_list.extend([copy.deepcopy(kid)] * rnd.randrange(1, 4))  # ≤ 4 extra: see the xattr pin
            if "weird_platform" in mutations and "manifests" in doc:
                kid["platform"] = rnd.choice(["linux/amd64", {"os": 1}, {"os": "linux"}, None, [],
                                              {"os": "linux", "architecture": "amd64", "variant": 7}])
        if "oversize" in mutations and rnd.random() < 0.5:
            doc["annotations"] = {"padding": "x" * (MAX + 1)}
        return doc

    def serialize(doc: dict, media_type: str) -> dict:
        data = json.dumps(mutate_doc(doc), indent=rnd.choice([None, 2])).encode()
        if "invalid_json" in mutations and rnd.random() < 0.5:
            data = data[: rnd.randrange(len(data))] if rnd.random() < 0.7 else b"\xff\xfe{not json"
        return put(data, media_type)

    entries = []
    for doc, plat in manifests:
        entry = serialize(doc, m_type)
        entry["platform"] = plat
        entries.append(entry)
    if "nested_index" in mutations:
        inner = serialize({"schemaVersion": 2, "mediaType": i_type, "manifests": entries[:1]}, i_type)
        entries.append(inner if rnd.random() < 0.5 else {**inner, "platform": platforms[0]})
    root_is_index = n > 1 or draw(st.booleans()) or "nested_index" in mutations
    if root_is_index:
        root_json = serialize({"schemaVersion": 2, "mediaType": i_type, "manifests": entries}, i_type)
    else:
        root_json = dict(entries[0])
        root_json.pop("platform")
    root = Descriptor(root_json["mediaType"], root_json["digest"], root_json["size"])

    # -- lies, after hashing -------------------------------------------------------------------
    others = [k for k in blobs if k != root.digest]
    if "digest_lie" in mutations and others:
        victim = rnd.choice(others)
        blobs[victim] = blobs[root.digest] if rnd.random() < 0.5 else blobs[victim][:-1] + b"!"
    if "self_reference" in mutations:
        # the registry names, as the root's digest, a digest the root itself lists
        listed = re.findall(rb"sha256:[a-f0-9]{64}", blobs[root.digest])
        if listed:
            root = Descriptor(root.media_type, listed[0].decode(), root.size)
    if "cycle" in mutations and others:
        # a child is served with the bytes of the root: index -> manifest -> "index" again
        blobs[rnd.choice(others)] = blobs[root.digest]
    if "missing_blob" in mutations and others:
        del blobs[rnd.choice(others)]
    return Scenario(root, blobs, types, mutations)


class MemoryRegistry:
    """A fetcher serving a scenario's bytes, whatever they are, in small chunks."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.served = 0

    @asynccontextmanager
    async def open(self, desc, start=0, end=None):
        if desc.digest not in self.blobs:
            raise NotFound(f"{desc.digest} not found")
        data = self.blobs[desc.digest]

        async def chunks():
            stop = len(data) if end is None else min(end, len(data))
            for i in range(start, stop, 65536):
                self.served += min(65536, stop - i)
                await trio.sleep(0)
                yield data[i: min(i + 65536, stop)]

        yield chunks()


# -- tier 2: the graph in-process -------------------------------------------------------------------


async def explore(scn: Scenario, cache: Path, *, all_platforms: bool) -> tuple[str, Tree | None]:
    """Open the image as a mount does, then look inside every directory as ``ls -R`` does."""
    store = LocalStore(cache)
    registry = MemoryRegistry(scn.blobs)
    image = Image(store, registry, scn.root, platform=HOST, all_platforms=all_platforms)
    with trio.fail_after(30):  # a hang is a failure, not a slow test
        try:
            await image.open()
        except ImagefsError as exc:
            assert str(exc).strip() and "\n" not in str(exc).strip()
            return "refused", None
        tree = Tree(image)
        tried: set[str] = set()
        while True:
            todo = [n for n in list(tree.dirs.values()) if n.desc.ref_key not in tried]
            if not todo:
                break
            for node in todo:
                tried.add(node.desc.ref_key)
                try:
                    await tree.expand(node)
                    if not has_children(node.desc) and node.desc.media_type not in d.LAYER_TYPES:
                        await image.ensure(node.desc)  # configs and artifacts are read whole, as a cat would
                except ImagefsError:
                    pass  # this directory answers EIO/ENOENT; the others must still work
    # a manifest is never buffered beyond the limit; what the registry served is bounded by the input
    assert registry.served <= sum(len(b) for b in scn.blobs.values()) * 4 + MAX
    return "mounted", tree


def check_store(cache: Path) -> None:
    blobs = cache / "blobs" / "sha256"
    for f in blobs.iterdir() if blobs.exists() else ():
        data = f.read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.name, "only verified bytes are committed"


def check_tree(tree: Tree, scn: Scenario) -> None:
    for node in tree.nodes:
        assert len(node.names) == len(set(node.names)), "a directory never lists a name twice"
    for name in tree.top.names:
        text = name.decode()
        assert "/" not in text and text not in (".", "..")
    # every descriptor directory is named by a ref key of a sha256 digest
    for key in tree.dirs:
        assert re.fullmatch(r"(manifest|index|layer|config|unknown)-sha256:[a-f0-9]{64}", key), key
    assert len(tree.dirs) <= 4 * (len(scn.blobs) + 1) + 16, "the view is bounded by what the registry holds"


# No shrinking: a scenario is its list of mutations, readable as it is, and shrinking megabyte
# manifests costs minutes.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


@settings(max_examples=150, deadline=None, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scn=scenarios(), all_platforms=st.booleans())
def test_hostile_graph_in_process(scn, all_platforms):
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        outcome, tree = trio.run(lambda: explore(scn, cache, all_platforms=all_platforms))
        check_store(cache)
        if tree is not None:
            check_tree(tree, scn)


def test_a_registry_naming_the_root_by_a_digest_it_lists_is_refused(tmp_path):
    """'An index that refers to itself': content cannot contain its own hash, so it takes a lie."""
    layer = b"l"
    config = b"{}"
    man = json.dumps({"schemaVersion": 2, "mediaType": d.OCI_MANIFEST,
                      "config": {"mediaType": d.OCI_CONFIG, "digest": sha(config), "size": 2},
                      "layers": [{"mediaType": d.OCI_LAYER, "digest": sha(layer), "size": 1}]}).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": d.OCI_INDEX, "manifests": [
        {"mediaType": d.OCI_INDEX, "digest": sha(man), "size": len(man), "platform": {"os": "linux", "architecture": "s390x"}},
        {"mediaType": d.OCI_MANIFEST, "digest": sha(man), "size": len(man), "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": d.OCI_MANIFEST, "digest": sha(man), "size": len(man), "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode()
    # the registry says the index's digest is the manifest's, and serves the index under it
    scn = Scenario(Descriptor(d.OCI_INDEX, sha(man), len(index)), {sha(man): index, sha(config): config, sha(layer): layer})
    assert trio.run(lambda: explore(scn, tmp_path / "a", all_platforms=True))[0] == "refused"
    # honest bytes, but one digest listed as an index and as a manifest, and twice as a manifest
    scn = Scenario(Descriptor(d.OCI_INDEX, sha(index), len(index)), {sha(man): man, sha(index): index,
                                                                    sha(config): config, sha(layer): layer})
    assert trio.run(lambda: explore(scn, tmp_path / "b", all_platforms=True))[0] == "refused", \
        "every platform asked for, and one entry is a manifest posing as an index"
    outcome, tree = trio.run(lambda: explore(scn, tmp_path / "c", all_platforms=False))
    assert outcome == "mounted"
    assert set(tree.dirs) == {f"index-{sha(index)}", f"index-{sha(man)}", f"manifest-{sha(man)}",
                              f"config-{sha(config)}", f"layer-{sha(layer)}"}
    assert tree.dirs[f"index-{sha(index)}"].names == [b"blob", f"index-{sha(man)}".encode(), f"manifest-{sha(man)}".encode()]
    assert f"index-{sha(man)}" not in tree.expanded, "a manifest's bytes read as an index: that directory errs"
    assert f"manifest-{sha(man)}" in tree.expanded
    check_store(tmp_path / "c")


# -- tier 3: real mounts through the proxy ------------------------------------------------------


_counter = itertools.count()


def serve(proxy, repo: str, scn: Scenario) -> None:
    """Make the proxy answer for ``repo`` with the scenario's bytes; anything else reaches the
    real registry, which knows no such repository (404)."""
    root_bytes = scn.blobs.get(scn.root.digest, b"{}")
    proxy.respond(rf"^/v2/{repo}/manifests/v1$", 200, root_bytes,
                  {"Content-Type": scn.root.media_type or "application/json", "Docker-Content-Digest": scn.root.digest})
    for digest, data in scn.blobs.items():
        proxy.respond(rf"^/v2/{repo}/(manifests|blobs)/{re.escape(digest)}$", 200, data,
                      {"Content-Type": scn.content_types.get(digest, "application/octet-stream"),
                       "Docker-Content-Digest": digest})


class Hung(AssertionError):
    pass


def run_bounded(cmd: list[str], cache: Path, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run a reader of the mount; if it hangs, kill the mount's server (its pid is in its mount
    record) so the kernel fails the stuck request, and report the hang."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for rec in mounts.live_mounts(cache):
            os.kill(rec.pid, 9)
        proc.kill()
        proc.communicate(timeout=10)
        raise Hung(f"{' '.join(cmd)} hung for {timeout:.0f}s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def walk_mount(mnt: Path, cache: Path) -> None:
    """List every descriptor directory and read every blob; errors are fine, a dead mount
    (ENOTCONN) or a hang is not. ``fs/`` and ``rootfs/`` (a layer's files) are another suite's."""
    dirs = [str(mnt)] + [str(mnt / n) for n in os.listdir(mnt) if "-sha256:" in n]
    done = run_bounded(["ls", "-l", *dirs], cache)
    assert "Transport endpoint is not connected" not in done.stderr, done.stderr
    blobs = [str(mnt / n / "blob") for n in os.listdir(mnt) if "-sha256:" in n]
    done = run_bounded(["sh", "-c", 'for f in "$@"; do head -c 65536 "$f" >/dev/null; done', "sh", *blobs], cache)
    assert "Transport endpoint is not connected" not in done.stderr, done.stderr
    assert os.listdir(mnt), "still serving"


@settings(max_examples=16, deadline=None, derandomize=True, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(scn=scenarios())
def test_hostile_registry_real_mounts(proxy, scn, tmp_path_factory):
    repo = f"hostile/e{next(_counter)}"
    tmp = tmp_path_factory.mktemp("hostile")
    mnt = tmp / "mnt"
    mnt.mkdir()
    proxy.clear_faults()
    serve(proxy, repo, scn)
    try:
        done = imagefs("mount", f"{proxy.host}/{repo}:v1", mnt, "--cache-dir", tmp / "cache", "--log-file",
                       tmp / "log", "--all-platforms", timeout=60)
        if done.returncode == 0:
            try:
                walk_mount(mnt, tmp / "cache")
            finally:  # fusermount3 directly: a CLI process per example is time the budget lacks
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        else:
            assert done.returncode == 1, done.stderr
            line = done.stderr.strip()
            assert line.startswith("imagefs: ") and "\n" not in line, done.stderr
            log = (tmp / "log").read_text()
            assert "exited" not in line and "Traceback" not in log, f"a crash, not a clear error:\n{log[-3000:]}"
        check_store(tmp / "cache")
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        proxy.clear_faults()


# -- crashes found, pinned until fixed (outside the files this suite's author may edit) ---------------


def test_manifest_claiming_an_absurd_size_is_a_clear_error(tmp_path):
    """Found by this suite: the writer (an ingest sized by the descriptor, EFBIG past 16 TiB on ext4)
    was taken before the manifest size limit was checked."""
    body = b'{"schemaVersion": 2, "layers": []}'
    scn = Scenario(Descriptor(d.OCI_MANIFEST, sha(body), 2**45), {sha(body): body})
    assert trio.run(lambda: explore(scn, tmp_path, all_platforms=False))[0] == "refused"


def test_index_with_many_entries_mounts_and_keeps_every_label(tmp_path):
    """Found by this suite: ext4 keeps one 4 KiB block of xattrs per file, so an index of ~35+
    entries failed setxattr (ENOSPC) after its blob was committed; now its labels go to a sidecar."""
    config = b"{}"
    entries = []
    blobs = {sha(config): config}
    for i in range(60):
        man = json.dumps({"schemaVersion": 2, "mediaType": d.OCI_MANIFEST, "annotations": {"i": str(i)},
                          "config": {"mediaType": d.OCI_CONFIG, "digest": sha(config), "size": 2}, "layers": []}).encode()
        blobs[sha(man)] = man
        entries.append({"mediaType": d.OCI_MANIFEST, "digest": sha(man), "size": len(man),
                        "platform": {"os": "linux", "architecture": f"arch{i}"}})
    index = json.dumps({"schemaVersion": 2, "mediaType": d.OCI_INDEX, "manifests": entries}).encode()
    blobs[sha(index)] = index
    scn = Scenario(Descriptor(d.OCI_INDEX, sha(index), len(index)), blobs)
    outcome, tree = trio.run(lambda: explore(scn, tmp_path, all_platforms=True))
    assert outcome == "mounted" and len(tree.dirs) == 62
    labels = LocalStore(tmp_path).labels(sha(index))
    assert [labels[f"containerd.io/gc.ref.content.{i}"] for i in range(60)] == [e["digest"] for e in entries]
    assert "containerd.io/gc.root" in labels


def test_two_failing_manifests_give_one_clear_error(proxy, images, mnt, cache_dir, tmp_path):
    """Found by this suite: two children failing at once used to leave dispatch as a trio.MultiError,
    which the command line did not turn into a one-line error (the mount process died instead)."""
    proxy.corrupt(images.amd.digest, offset=10)
    proxy.corrupt(images.arm.digest, offset=10)
    done = imagefs("mount", f"{proxy.host}/test/oci:v1", mnt, "--cache-dir", cache_dir, "--all-platforms",
                   "--log-file", tmp_path / "log")
    assert done.returncode == 1
    assert "content has digest" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_a_layer_whose_bytes_do_not_fit_its_descriptor_errs_promptly(proxy, mnt, cache_dir, tmp_path):
    """Reading the blob gives EIO at once; listing the layer's files must too, not hang.

    Pinned: reader.py BlobReader.prefetch loops ``while not committed`` and counts only verification
    failures, so a fetch that fails (here: the registry has 991 bytes for a 91-byte descriptor) is
    claimed again at once, forever — thousands of GETs a second, and the ``ls`` never answered.
    """
    layer, served = os.urandom(91), os.urandom(991)
    config = b'{"architecture":"amd64","os":"linux"}'
    man = json.dumps({"schemaVersion": 2, "mediaType": d.OCI_MANIFEST,
                      "config": {"mediaType": d.OCI_CONFIG, "digest": sha(config), "size": len(config)},
                      "layers": [{"mediaType": d.OCI_LAYER_GZIP, "digest": sha(layer), "size": len(layer)}]}).encode()
    scn = Scenario(Descriptor(d.OCI_MANIFEST, sha(man), len(man)), {sha(man): man, sha(config): config, sha(layer): served},
                   {sha(man): d.OCI_MANIFEST})
    serve(proxy, "hostile/short", scn)
    imagefs("mount", f"{proxy.host}/hostile/short:v1", mnt, "--cache-dir", cache_dir, "--log-file", tmp_path / "log",
            check=True)
    try:
        blob = run_bounded(["cat", str(mnt / f"layer-{sha(layer)}" / "blob")], cache_dir)
        assert blob.returncode == 1 and "Input/output error" in blob.stderr
        files = mnt / f"layer-{sha(layer)}" / "fs"
        listing = run_bounded(["ls", str(files)], cache_dir, timeout=10)
        assert listing.returncode != 0 and len(proxy.gets(sha(layer))) < 20
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
