"""Mirrors: containerd's hosts.toml, ``--mirror``, fallback to the upstream, and a real
pull-through cache (``docker-registry`` with ``proxy: remoteurl:``) in front of the session
registry, with a counting proxy in front of the mirror."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from imagefs.descriptors import OCI_MANIFEST
from imagefs.errors import RegistryError
from imagefs.reference import parse
from imagefs.registry import hosts
from imagefs.registry.client import RegistryClient
from imagefs.registry.hosts import HostsConfigError, endpoints, find_hosts_file, mirror_endpoint, parse_hosts_file
from tests.support import Proxy, Registry
from tests.support.mounting import Mount
from tests.test_registry_transport import Blobs, answer, fail, layer, read

TEST_TIME_LIMIT = 30
AMD64 = ("--platform", "linux/amd64")




# -- hosts.toml -----------------------------------------------------------------------------------

FULL = """
server = "https://registry.example:5000"
ca = "upstream-ca.pem"
[header]
  x-upstream = "u"

[host."https://mirror-a.example"]
  capabilities = ["pull", "resolve"]
  ca = ["a-ca.pem", "/etc/ssl/abs.pem"]
  skip_verify = false
  client = [["client.cert", "client.key"], "both.pem"]
  dial_timeout = "1m1.5s"
  [host."https://mirror-a.example".header]
    x-custom = ["one", "two"]

[host."http://mirror-b.example/some/prefix"]
  capabilities = ["pull"]
  skip_verify = true
  dial_timeout = "250ms"

[host."mirror-c.example/v2/upstream"]
  override_path = true
"""


def test_hosts_file_parsed_as_containerd_does(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text(FULL)
    eps = parse_hosts_file(path, "registry.example:5000", "https://registry.example:5000")
    assert [e.root for e in eps] == [
        "https://mirror-a.example/v2",
        "http://mirror-b.example/some/prefix/v2",
        "https://mirror-c.example/v2/upstream",
        "https://registry.example:5000/v2",
    ]
    a, b, c, server = eps
    assert a.capabilities == {"pull", "resolve"} and b.capabilities == {"pull"}
    assert c.capabilities == server.capabilities == {"pull", "resolve", "push"}
    assert a.ca == (str(tmp_path / "a-ca.pem"), "/etc/ssl/abs.pem")
    assert a.client_certs == ((str(tmp_path / "client.cert"), str(tmp_path / "client.key")), (str(tmp_path / "both.pem"), ""))
    assert a.skip_verify is False and b.skip_verify is True and c.skip_verify is None
    assert a.headers == (("x-custom", "one"), ("x-custom", "two")) and server.headers == (("x-upstream", "u"),)
    assert a.dial_timeout == pytest.approx(61.5) and b.dial_timeout == pytest.approx(0.25) and c.dial_timeout is None
    assert server.ca == (str(tmp_path / "upstream-ca.pem"),)
    # mirrors say which registry they stand in for; the registry itself does not need to
    assert a.ns == b.ns == c.ns == "registry.example:5000" and server.ns is None
    assert a.own_tls and b.own_tls and not c.own_tls


def test_hosts_file_without_server_falls_back_to_the_registry(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text('[host."https://mirror.example"]\ncapabilities = ["pull"]\n')
    eps = parse_hosts_file(path, "docker.io", "https://registry-1.docker.io", own={"docker.io", "registry-1.docker.io"})
    assert [e.root for e in eps] == ["https://mirror.example/v2", "https://registry-1.docker.io/v2"]
    assert eps[1].ns is None and eps[0].ns == "docker.io"


@pytest.mark.parametrize("text, message", [
    ('[host."https://m"]\ncapabilities = ["pull", "fly"]', "unknown capability fly"),
    ('server = ', "hosts.toml"),
    ('[host."ftp://m"]', "only http:// and https://"),
    ('[host."https://m"]\ndial_timeout = "soon"', "expected a duration"),
    ('[host."https://m"]\nclient = [["a", "b", "c"]]', "client: invalid entry"),
    ('[host."https://m"]\nheader = "x"', "header must be a table"),
])
def test_bad_hosts_files_are_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    with pytest.raises(HostsConfigError, match=message) as err:
        parse_hosts_file(path, "r.example", "https://r.example")
    assert str(path) in str(err.value)


def test_host_directory_lookup_order(tmp_path, monkeypatch):
    assert find_hosts_file(tmp_path, "r.example:5000") is None
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text("")
    assert find_hosts_file(tmp_path, "r.example:5000") == tmp_path / "_default" / "hosts.toml"
    (tmp_path / "r.example:5000").mkdir()
    assert find_hosts_file(tmp_path, "r.example:5000") is None, "the first directory found decides, as in containerd"
    (tmp_path / "r.example:5000" / "hosts.toml").write_text("")
    assert find_hosts_file(tmp_path, "r.example:5000") == tmp_path / "r.example:5000" / "hosts.toml"
    (tmp_path / "r.example_5000_").mkdir()
    (tmp_path / "r.example_5000_" / "hosts.toml").write_text("")
    assert find_hosts_file(tmp_path, "r.example:5000") == tmp_path / "r.example_5000_" / "hosts.toml"

    monkeypatch.setattr(hosts, "HOSTS_DIRS", (tmp_path / "imagefs", tmp_path / "containerd"))
    assert hosts.default_hosts_dir() is None
    (tmp_path / "containerd").mkdir()
    assert hosts.default_hosts_dir() == tmp_path / "containerd"
    (tmp_path / "imagefs").mkdir()
    assert hosts.default_hosts_dir() == tmp_path / "imagefs"


def test_mirror_flag_and_endpoint_order(tmp_path):
    assert mirror_endpoint("mirror.example", "docker.io").root == "https://mirror.example/v2"
    assert mirror_endpoint("127.0.0.1:5001", "docker.io").root == "http://127.0.0.1:5001/v2"
    assert mirror_endpoint("mirror.example:5000", "docker.io", plain_http=True).root == "http://mirror.example:5000/v2"
    assert mirror_endpoint("https://m.example/cache/", "docker.io").capabilities == {"pull", "resolve"}
    d = tmp_path / "docker.io"
    d.mkdir()
    (d / "hosts.toml").write_text('[host."https://from-file.example"]\n')
    eps = endpoints("docker.io", "https://registry-1.docker.io", mirrors=["https://flag.example"], hosts_dir=tmp_path)
    assert [e.root for e in eps] == ["https://flag.example/v2", "https://from-file.example/v2", "https://registry-1.docker.io/v2"]
    assert [e.root for e in endpoints("quay.io", "https://quay.io", hosts_dir=tmp_path)] == ["https://quay.io/v2"]


# -- fallback, with MockTransport -----------------------------------------------------------------


class Hosts:
    """Routes MockTransport requests to one :class:`Blobs` per host."""

    def __init__(self, **by_host: Blobs) -> None:
        self.by_host = by_host
        self.log: list[tuple[str, str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.log.append((request.url.host, request.method, request.url.path.rsplit("/", 2)[-2]))
        return self.by_host[request.url.host](request)


DATA = os.urandom(50_000)


async def test_a_failing_mirror_falls_back_and_is_left_out_for_a_while(autojump_clock, caplog):
    mirror, upstream = Blobs(DATA), Blobs(DATA)
    mirror.script = [answer(503)] * 10
    route = Hosts(**{"mirror.test": mirror, "registry.test": upstream})
    with caplog.at_level(logging.INFO, logger="imagefs"):
        async with RegistryClient(parse("registry.test/test/x:v1"), mirrors=["https://mirror.test"],
                                  transport=httpx.MockTransport(route)) as client:
            assert await read(client, layer(DATA)) == DATA
            assert await read(client, layer(DATA), 10, 20) == DATA[10:20]
    assert [h for h, _, _ in route.log] == ["mirror.test", "mirror.test", "registry.test", "registry.test"]
    assert "mirror https://mirror.test: " in caplog.text and "falling back to registry https://registry.test" in caplog.text


async def test_a_mirror_without_the_blob_falls_back_but_is_asked_next_time(autojump_clock):
    mirror, upstream = Blobs(), Blobs(DATA)
    route = Hosts(**{"mirror.test": mirror, "registry.test": upstream})
    async with RegistryClient(parse("registry.test/test/x:v1"), mirrors=["https://mirror.test"],
                              transport=httpx.MockTransport(route)) as client:
        assert await read(client, layer(DATA)) == DATA
        assert await read(client, layer(DATA)) == DATA
    assert [h for h, _, _ in route.log] == ["mirror.test", "registry.test"] * 2


async def test_a_stream_cut_at_a_dead_mirror_resumes_at_the_upstream(autojump_clock):
    mirror, upstream = Blobs(DATA), Blobs(DATA)
    mirror.cuts = [20_000]
    mirror.script = [None] + [fail(httpx.ConnectError("[Errno 111] Connection refused"))] * 10
    route = Hosts(**{"mirror.test": mirror, "registry.test": upstream})
    async with RegistryClient(parse("registry.test/test/x:v1"), mirrors=["https://mirror.test"],
                              transport=httpx.MockTransport(route)) as client:
        assert await read(client, layer(DATA)) == DATA
    assert [r.headers.get("range") for r in mirror.requests] == [None, "bytes=20000-49999"]
    assert [r.headers.get("range") for r in upstream.requests] == ["bytes=20000-49999"]


async def test_only_resolve_capable_hosts_resolve_tags(tmp_path, autojump_clock):
    manifest = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","config":{},"layers":[]}'
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest, "Content-Length": str(len(manifest))}
        if "/blobs/" in request.url.path:
            return httpx.Response(200, headers={"Content-Length": str(len(DATA))}, stream=httpx.ByteStream(DATA))
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(manifest if request.method == "GET" else b""))

    d = tmp_path / "registry.test"
    d.mkdir()
    (d / "hosts.toml").write_text('[host."https://pull-only.test"]\ncapabilities = ["pull"]\n'
                                  '[host."https://pull-only.test".header]\nx-mirror-key = "k1"\n')
    async with RegistryClient(parse("registry.test/test/x:v1"), hosts_dir=tmp_path,
                              transport=httpx.MockTransport(handler)) as client:
        root = await client.resolve()
        assert root.digest == digest
        assert await client.fetch_manifest(root) == manifest
        assert await read(client, layer(DATA)) == DATA
    assert [(r.method, r.url.host) for r in seen] == [("HEAD", "registry.test"), ("GET", "pull-only.test"), ("GET", "pull-only.test")]
    for r in seen[1:]:
        assert r.url.params["ns"] == "registry.test" and r.headers["x-mirror-key"] == "k1"
    assert "ns" not in seen[0].url.params and "x-mirror-key" not in seen[0].headers


async def test_no_host_may_resolve_is_a_clear_error(tmp_path, autojump_clock):
    d = tmp_path / "registry.test"
    d.mkdir()
    (d / "hosts.toml").write_text('capabilities = ["pull"]\n')
    async with RegistryClient(parse("registry.test/test/x:v1"), hosts_dir=tmp_path,
                              transport=httpx.MockTransport(Blobs())) as client:
        with pytest.raises(RegistryError, match="no configured host may pull and resolve"):
            await client.resolve()


# -- a real pull-through cache ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mirror(registry, tmp_path_factory) -> Iterator[tuple[Registry, Proxy]]:
    """distribution's pull-through cache of the session registry, behind its own counting proxy."""
    reg = Registry(tmp_path_factory.mktemp("mirror"), extra_config={"proxy": {"remoteurl": registry.url}})
    with reg, Proxy(reg.host) as front:
        yield reg, front


@pytest.fixture
def mirror_proxy(mirror) -> Proxy:
    reg, front = mirror
    if not reg.running:
        reg.start()
    front.clear_faults()
    front.reset()
    return front


def sha256sum(path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True, timeout=20).stdout.split()[0]


def stored(reg: Registry, digest: str) -> bool:
    hexdigest = digest.split(":")[1]
    return (reg.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data").exists()


def test_mount_through_a_pull_through_mirror(proxy, mirror, mirror_proxy, images, mnt, cache_dir):
    reg, _ = mirror
    amd = images.amd
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--mirror", mirror_proxy.url) as m:
        for blob in [amd.config, *amd.layers]:
            kind = "config" if blob is amd.config else "layer"
            assert sha256sum(m.path(f"{kind}-{blob.digest}", "blob")) == blob.digest.split(":")[1]
            assert mirror_proxy.gets(blob.digest), f"{blob.digest} came from the mirror"
    assert [h for h in proxy.hits if "/test/oci/" in h.path] == [], "nothing was asked of the upstream directly"
    assert mirror_proxy.matching("/manifests/v1", "HEAD") and mirror_proxy.gets(images.oci.digest)
    assert all(parse_qs(urlsplit(h.path).query)["ns"] == [proxy.host] for h in mirror_proxy.hits)
    # the cache kept what it served, for the next machine (it stores a blob after serving it)
    deadline = time.monotonic() + 30
    while not all(stored(reg, b.digest) for b in [amd.config, *amd.layers]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(stored(reg, b.digest) for b in [amd.config, *amd.layers])


def test_mount_through_hosts_toml(proxy, mirror_proxy, images, mnt, cache_dir, tmp_path):
    hosts_dir = tmp_path / "certs.d"
    d = hosts_dir / (proxy.host.replace(":", "_") + "_")  # containerd's name for HOST:PORT
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(
        f'server = "{proxy.url}"\n\n'
        f'[host."http://127.0.0.1:1"]\n  capabilities = ["pull", "resolve"]\n\n'  # nobody listens: skipped
        f'[host."{mirror_proxy.url}"]\n  capabilities = ["pull"]\n'
        f'  [host."{mirror_proxy.url}".header]\n    x-imagefs-test = "from-hosts-toml"\n'
    )
    shared = images.shared
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--hosts-dir", hosts_dir) as m:
        assert sha256sum(m.path(f"layer-{shared.digest}", "blob")) == shared.digest.split(":")[1]
        log = m.log_text()
    # the tag was resolved by the only resolve-capable host left, the upstream; content came from the mirror
    assert [h.method for h in proxy.hits if "/test/oci/" in h.path] == ["HEAD"]
    assert mirror_proxy.gets(images.oci.digest) and mirror_proxy.gets(shared.digest)
    assert not mirror_proxy.matching("/manifests/v1")
    assert {h.request_headers.get("x-imagefs-test") for h in mirror_proxy.hits} == {"from-hosts-toml"}
    assert "mirror http://127.0.0.1:1: cannot reach registry 127.0.0.1:1" in log
    assert log.count("skipping this mirror") == 1, "the dead mirror was tried once, then left out"


def test_with_the_mirror_down_the_upstream_serves(proxy, mirror, mirror_proxy, images, mnt, cache_dir):
    reg, _ = mirror
    reg.stop()
    try:
        layer_ = images.amd.layers[-1]
        with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--mirror", mirror_proxy.url) as m:
            assert sha256sum(m.path(f"layer-{layer_.digest}", "blob")) == layer_.digest.split(":")[1]
            log = m.log_text()
        assert [h.status for h in mirror_proxy.hits] == [502, 502], "tried (with one retry), then left out"
        assert proxy.matching("/manifests/v1", "HEAD") and proxy.gets(layer_.digest)
        assert f"mirror {mirror_proxy.url}: registry {mirror_proxy.host} unavailable" in log and f"falling back to registry {proxy.url}" in log
    finally:
        reg.start()
