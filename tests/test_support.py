"""Tests of the test support itself: the real registry and the fault-injecting proxy.

Everything runs against a real ``docker-registry`` on 127.0.0.1; these tests
pin down the behaviour other tests rely on (exact byte counts, exactly one
flipped byte, a cut really being a mid-body connection death ...).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support import Proxy, Registry, RegistryError

TEST_TIME_LIMIT = 20  # seconds; each test should take well under 2 s
REPO = "test/blobs"




@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def proxy(registry: Registry) -> Iterator[Proxy]:
    with Proxy(registry.host) as prx:
        yield prx


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        yield c


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(client: httpx.Client, base: str, data: bytes, repo: str = REPO) -> str:
    """Monolithic upload (POST, then PUT to Location). Returns the digest.

    Note: httpx *replaces* a URL's query when given ``params=``, which would
    drop the registry's ``_state``; hence ``copy_merge_params``.
    """
    digest = digest_of(data)
    resp = client.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert resp.status_code == 202, resp.text
    location = httpx.URL(resp.headers["location"]).copy_merge_params({"digest": digest})
    resp = client.put(location, content=data, headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 201, resp.text
    assert resp.headers["docker-content-digest"] == digest
    return digest


def blob_url(base: str, digest: str, repo: str = REPO) -> str:
    return f"{base}/v2/{repo}/blobs/{digest}"


def read_until_error(client: httpx.Client, url: str) -> tuple[bytes, Exception | None]:
    """Stream a GET, returning what arrived and the error that ended it (if any)."""
    got = bytearray()
    try:
        with client.stream("GET", url) as resp:
            for piece in resp.iter_raw():
                got += piece
    except httpx.HTTPError as exc:
        return bytes(got), exc
    return bytes(got), None


# -- registry ---------------------------------------------------------------


def test_registry_restart_keeps_port_and_content(tmp_path: Path, client: httpx.Client) -> None:
    reg = Registry(tmp_path / "reg")
    reg.start()
    try:
        data = os.urandom(5000)
        digest = push_blob(client, reg.url, data)
        port = reg.port
        reg.stop()
        assert not reg.running
        with pytest.raises(httpx.ConnectError):
            client.get(f"{reg.url}/v2/")
        reg.start()
        assert reg.port == port and reg.host == f"127.0.0.1:{port}"
        resp = client.get(blob_url(reg.url, digest))
        assert resp.status_code == 200 and resp.content == data
    finally:
        reg.stop()
    config = reg.config_path.read_text()
    assert f"rootdirectory: \"{reg.storage}\"" in config
    assert "level: \"warn\"" in config
    # Access log lines land in registry.log even at log level warn.
    assert f'"GET /v2/{REPO}/blobs/{digest} HTTP/1.1" 200 5000' in reg.log_path.read_text()


def test_registry_start_failure_reports_log_tail(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "bad", extra_config={"log": {"level": "nonsense"}})
    started = time.monotonic()
    with pytest.raises(RegistryError, match="invalid loglevel nonsense"):
        reg.start()
    assert time.monotonic() - started < 10
    assert not reg.running


def test_registry_refuses_busy_port(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(RegistryError, match="already in use"):
        Registry(tmp_path / "other", port=registry.port).start()


def test_registry_extra_config_and_yaml_are_rendered(tmp_path: Path) -> None:
    reg = Registry(
        tmp_path / "r",
        extra_config={"http": {"headers": {"X-Test": ["yes"]}}},
        extra_yaml="proxy:\n  remoteurl: http://127.0.0.1:1\n",
    )
    text = reg.config_text()
    assert '  headers:\n    X-Test:\n      - "yes"\n' in text
    assert text.endswith("proxy:\n  remoteurl: http://127.0.0.1:1\n")
    assert f'addr: "{reg.host}"' in text  # deep merge kept the base http section


def test_registry_can_serve_another_registrys_storage(tmp_path: Path, registry: Registry, client: httpx.Client) -> None:
    """The pattern the auth/TLS tests use: a second registry over the first one's storage."""
    data = os.urandom(3000)
    digest = push_blob(client, registry.url, data)
    with Registry(tmp_path / "second", extra_config={"storage": {"filesystem": {"rootdirectory": str(registry.storage)}}}) as second:
        assert second.storage == registry.storage
        assert second.port != registry.port
        assert client.get(blob_url(second.url, digest)).content == data


# -- proxy: plain forwarding --------------------------------------------------


def test_push_through_proxy_then_full_and_range_reads(proxy: Proxy, client: httpx.Client) -> None:
    data = os.urandom(100_000)
    digest = push_blob(client, proxy.url, data)

    # The upload went through the proxy because Location was rewritten.
    puts = proxy.matching("/blobs/uploads/", "PUT")
    assert len(puts) == 1 and puts[0].status == 201
    assert puts[0].request_headers["content-length"] == str(len(data))

    full = client.get(blob_url(proxy.url, digest))
    assert full.status_code == 200 and full.content == data
    assert full.headers["docker-content-digest"] == digest

    part = client.get(blob_url(proxy.url, digest), headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert part.content == data[10:20]
    assert proxy.gets(digest)[-1].request_headers["range"] == "bytes=10-19"

    head = client.head(blob_url(proxy.url, digest))
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(data)) and head.content == b""
    assert proxy.matching(digest, "HEAD")[0].body_bytes == 0


def test_location_is_rewritten_to_proxy(proxy: Proxy, registry: Registry, client: httpx.Client) -> None:
    resp = client.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/")
    assert resp.status_code == 202
    location = resp.headers["location"]
    assert location.startswith(f"{proxy.url}/v2/{REPO}/blobs/uploads/")
    assert registry.host not in location
    # Direct to the registry, the Location names the registry itself.
    direct = client.post(f"{registry.url}/v2/{REPO}/blobs/uploads/")
    assert direct.headers["location"].startswith(f"{registry.url}/v2/")


def test_chunked_patch_upload_through_proxy(proxy: Proxy, client: httpx.Client) -> None:
    """Request bodies without Content-Length are streamed upstream chunked."""
    data = os.urandom(300_000)
    digest = digest_of(data)
    resp = client.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/")

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(data), 70_000):
            yield data[i : i + 70_000]

    patch = client.patch(resp.headers["location"], content=pieces())
    assert patch.status_code == 202, patch.text
    assert patch.headers["range"] == f"0-{len(data) - 1}"
    assert proxy.matching("/uploads/", "PATCH")[0].request_headers["transfer-encoding"] == "chunked"
    put = client.put(httpx.URL(patch.headers["location"]).copy_merge_params({"digest": digest}))
    assert put.status_code == 201, put.text
    assert client.get(blob_url(proxy.url, digest)).content == data


def test_keep_alive_serves_several_requests_on_one_connection(proxy: Proxy, client: httpx.Client) -> None:
    data = os.urandom(2000)
    digest = push_blob(client, proxy.url, data)
    conn = http.client.HTTPConnection(proxy.host, timeout=5)
    try:
        conn.request("GET", f"/v2/{REPO}/blobs/{digest}")
        first = conn.getresponse()
        assert first.read() == data
        sock = conn.sock
        conn.request("HEAD", f"/v2/{REPO}/blobs/{digest}")
        head = conn.getresponse()
        assert head.status == 200 and head.getheader("Content-Length") == "2000" and head.read() == b""
        conn.request("GET", f"/v2/{REPO}/blobs/{digest}", headers={"Range": "bytes=0-0"})
        third = conn.getresponse()
        assert third.status == 206 and third.read() == data[:1]
        assert conn.sock is sock, "proxy closed a keep-alive connection"
    finally:
        conn.close()


def test_bytes_sent_counts_exactly(proxy: Proxy, client: httpx.Client) -> None:
    data = os.urandom(70_000)
    other = os.urandom(1234)
    digest = push_blob(client, proxy.url, data)
    other_digest = push_blob(client, proxy.url, other)
    proxy.reset()
    assert proxy.hits == [] and proxy.bytes_sent(digest) == 0

    client.get(blob_url(proxy.url, digest))
    client.get(blob_url(proxy.url, digest), headers={"Range": "bytes=100-1099"})
    client.head(blob_url(proxy.url, digest))
    client.get(blob_url(proxy.url, other_digest))
    # The hit is visible as soon as the client has the whole response.
    assert proxy.bytes_sent(digest) == 70_000 + 1000
    assert proxy.bytes_sent(other_digest) == 1234
    assert len(proxy.gets("/blobs/")) == 3
    assert [h.status for h in proxy.gets(digest)] == [200, 206]


def test_chunked_upstream_is_streamed_and_reframed(tmp_path: Path) -> None:
    """A body without Content-Length is re-chunked, streamed (not buffered), and keep-alive survives."""
    release = threading.Event()
    first, rest = b"A" * 1000, b"B" * 300_000

    class Chunky(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
            if self.path == "/wait":
                release.wait(5)
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Chunky)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with Proxy(f"127.0.0.1:{upstream.server_address[1]}") as prx, closing(
            http.client.HTTPConnection(prx.host, timeout=5)
        ) as conn:
            conn.request("GET", "/wait")
            resp = conn.getresponse()
            assert resp.getheader("Transfer-Encoding") == "chunked"
            # The first chunk arrives while the upstream is still holding back
            # the rest (release is only set below): the proxy streams.
            head = b""
            while len(head) < len(first):
                piece = resp.read1(len(first) - len(head))
                assert piece, "body ended early"
                head += piece
            assert head == first
            release.set()
            assert resp.read() == rest
            sock = conn.sock
            conn.request("GET", "/again")
            again = conn.getresponse()
            assert again.read() == first + rest
            assert conn.sock is sock, "keep-alive lost after a chunked response"
            assert prx.hits[-1].body_bytes == len(first) + len(rest)

            # An HTTP/1.0 client cannot take chunked: close-delimited instead.
            out = subprocess.run(
                ["curl", "-sS", "--http1.0", "--max-time", "5", "-D", "-", "-o", str(tmp_path / "b"), f"{prx.url}/x"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert out.returncode == 0, out.stderr
            assert "transfer-encoding" not in out.stdout.lower()
            assert (tmp_path / "b").read_bytes() == first + rest
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_curl_range_through_proxy(proxy: Proxy, client: httpx.Client, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    digest = push_blob(client, proxy.url, data)
    out_file = tmp_path / "part"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "-D", "-", "-r", "10-19", "-o", str(out_file), blob_url(proxy.url, digest)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 206")
    assert f"Content-Range: bytes 10-19/{len(data)}" in out.stdout
    assert out_file.read_bytes() == data[10:20]
    assert proxy.gets(digest)[-1].request_headers["range"] == "bytes=10-19"


def test_registry_416_short_body_is_mirrored(proxy: Proxy, registry: Registry, client: httpx.Client) -> None:
    """docker-registry answers an unsatisfiable Range with 416, Content-Length = blob size
    and a 33-byte text body, then closes; the proxy must not paper over that."""
    data = os.urandom(1000)
    digest = push_blob(client, proxy.url, data)
    for base in (registry.url, proxy.url):
        with pytest.raises(httpx.RemoteProtocolError, match="received 33 bytes, expected 1000"):
            client.get(blob_url(base, digest), headers={"Range": "bytes=5000-"})
    hit = proxy.gets(digest)[-1]
    assert (hit.status, hit.body_bytes, hit.fault) == (416, 33, "upstream-short")


def test_upstream_down_gives_502(proxy: Proxy, registry: Registry, client: httpx.Client) -> None:
    registry.stop()
    resp = client.get(f"{proxy.url}/v2/")
    assert resp.status_code == 502
    assert proxy.hits[-1].fault == "upstream-error"
    registry.start()
    assert client.get(f"{proxy.url}/v2/").status_code == 200


def test_stop_drops_idle_keep_alive_connections(registry: Registry) -> None:
    prx = Proxy(registry.host)
    prx.start()
    conn = http.client.HTTPConnection(prx.host, timeout=5)
    try:
        conn.request("GET", "/v2/")
        assert conn.getresponse().read() == b"{}"
        prx.stop()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/v2/")
            conn.getresponse().read()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", prx.port), timeout=2)
    finally:
        conn.close()
        prx.stop()


# -- proxy: faults ------------------------------------------------------------


def test_corrupt_flips_one_byte_only_where_covered(proxy: Proxy, client: httpx.Client) -> None:
    data = os.urandom(200_000)
    digest = push_blob(client, proxy.url, data)
    url = blob_url(proxy.url, digest)
    rule = proxy.corrupt(digest, offset=150_000)

    full = client.get(url).content
    diffs = [i for i in range(len(data)) if full[i] != data[i]]
    assert diffs == [150_000] and full[150_000] == data[150_000] ^ 0xFF
    assert proxy.gets(digest)[-1].fault == "corrupt"

    assert client.get(url, headers={"Range": "bytes=10-19"}).content == data[10:20]
    covered = client.get(url, headers={"Range": "bytes=149995-150004"}).content
    assert covered == data[149_995:150_000] + bytes([data[150_000] ^ 0xFF]) + data[150_001:150_005]
    tail = client.get(url, headers={"Range": "bytes=150000-"}).content
    assert tail[0] == data[150_000] ^ 0xFF and tail[1:] == data[150_001:]
    assert rule.applied == 3
    assert client.head(url).headers["content-length"] == str(len(data))

    rule.clear()
    assert client.get(url).content == data


def test_corrupt_manifest_by_digest_and_by_tag(proxy: Proxy, client: httpx.Client) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = os.urandom(100)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": push_blob(client, proxy.url, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": push_blob(client, proxy.url, layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    mtype = "application/vnd.oci.image.manifest.v1+json"
    put = client.put(f"{proxy.url}/v2/{REPO}/manifests/v1", content=manifest, headers={"Content-Type": mtype})
    assert put.status_code == 201, put.text
    mdigest = digest_of(manifest)
    assert put.headers["docker-content-digest"] == mdigest

    proxy.corrupt(mdigest, offset=0)
    for ref in (mdigest, "v1"):
        got = client.get(f"{proxy.url}/v2/{REPO}/manifests/{ref}", headers={"Accept": mtype})
        assert got.headers["content-type"] == mtype
        assert got.content[0] == manifest[0] ^ 0xFF and got.content[1:] == manifest[1:]
    proxy.clear_faults()
    assert client.get(f"{proxy.url}/v2/{REPO}/manifests/v1", headers={"Accept": mtype}).content == manifest


def test_cut_drops_connection_mid_body(proxy: Proxy, client: httpx.Client, tmp_path: Path) -> None:
    data = os.urandom(500_000)
    digest = push_blob(client, proxy.url, data)
    url = blob_url(proxy.url, digest)
    proxy.cut(digest, after=123_456)

    got, error = read_until_error(client, url)
    assert isinstance(error, httpx.ReadError)  # connection reset, not a clean EOF
    assert got == data[:123_456]
    assert proxy.bytes_sent(digest) == 123_456
    assert proxy.gets(digest)[-1].fault == "cut"

    # A real client sees the same: curl error 56 (recv failure) and a short file.
    out_file = tmp_path / "cut"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "-o", str(out_file), url], capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 56, out.stderr
    assert "reset" in out.stderr.lower()
    assert out_file.read_bytes() == data[:123_456]

    # A response no longer than `after` passes intact.
    small = client.get(url, headers={"Range": "bytes=0-99"})
    assert small.status_code == 206 and small.content == data[:100]

    proxy.clear_faults()
    assert client.get(url).content == data


def test_cut_times_lets_a_range_resume_succeed(proxy: Proxy, client: httpx.Client) -> None:
    data = os.urandom(300_000)
    digest = push_blob(client, proxy.url, data)
    url = blob_url(proxy.url, digest)
    rule = proxy.cut(digest, after=1000, times=1)
    got, error = read_until_error(client, url)
    assert error is not None and len(got) == 1000
    resumed = client.get(url, headers={"Range": f"bytes={len(got)}-"})
    assert resumed.status_code == 206 and got + resumed.content == data
    assert rule.applied == 1


def test_respond_times_then_pass_through(proxy: Proxy, client: httpx.Client) -> None:
    rule = proxy.respond(
        r"/manifests/",
        503,
        b'{"errors":[{"code":"UNAVAILABLE"}]}',
        {"Content-Type": "application/json", "Retry-After": "1"},
        times=2,
    )
    url = f"{proxy.url}/v2/{REPO}/manifests/latest"
    for _ in range(2):
        resp = client.get(url)
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.json() == {"errors": [{"code": "UNAVAILABLE"}]}
    passed = client.get(url)
    assert passed.status_code == 404 and passed.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert rule.applied == 2 and not rule.active
    assert [h.fault for h in proxy.gets("/manifests/")] == ["respond", "respond", None]


def test_respond_method_filter_head_and_content_type(proxy: Proxy, client: httpx.Client) -> None:
    schema1 = b'{"schemaVersion": 1, "name": "test/blobs", "tag": "old"}'
    mtype = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    proxy.respond(r"/manifests/old$", 200, schema1, {"Content-Type": mtype}, method="GET")
    proxy.respond(r"/manifests/old$", 200, schema1, {"Content-Type": mtype}, method="HEAD")
    url = f"{proxy.url}/v2/{REPO}/manifests/old"
    got = client.get(url)
    assert got.headers["content-type"] == mtype and got.content == schema1
    head = client.head(url)
    assert head.headers["content-length"] == str(len(schema1)) and head.content == b""
    # Not matched: other method / other path go to the registry.
    assert client.delete(url).status_code != 200
    assert client.get(f"{proxy.url}/v2/").status_code == 200


def test_respond_answers_upload_requests_and_drains_their_body(proxy: Proxy, client: httpx.Client) -> None:
    proxy.respond(r"/blobs/uploads/", 429, headers={"Retry-After": "0"}, times=1)
    resp = client.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/", content=os.urandom(100_000))
    assert resp.status_code == 429
    # Same keep-alive connection still usable: the body was consumed.
    assert push_blob(client, proxy.url, b"after 429") == digest_of(b"after 429")


def test_delay_slows_matching_requests_concurrently(proxy: Proxy, client: httpx.Client) -> None:
    rule = proxy.delay(r"^/v2/$", 0.4)
    results: list[float] = []
    # The clients are built first (each loads a TLS context: CPU time that, in the threads, spread
    # the three requests' starts by up to 0.2 s on a loaded machine) and released together.
    clients = [httpx.Client(timeout=5.0, trust_env=False) for _ in range(3)]
    go = threading.Barrier(3)

    def fetch(c: httpx.Client) -> None:
        go.wait(10)
        t0 = time.monotonic()
        assert c.get(f"{proxy.url}/v2/").status_code == 200
        results.append(time.monotonic() - t0)

    threads = [threading.Thread(target=fetch, args=(c,)) for c in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
    finally:
        for c in clients:
            c.close()
    assert len(results) == 3 and min(results) >= 0.4
    # Served in parallel, not one after another: all three were in flight at
    # once (checked on the proxy's own timestamps, immune to machine load).
    hits = proxy.matching("/v2/")
    assert len(hits) == 3
    assert max(h.started for h in hits) < min(h.finished or 0.0 for h in hits)
    assert rule.applied == 3
    client.get(f"{proxy.url}/v2/_catalog")
    assert rule.applied == 3  # other paths are not delayed


def test_delay_times_limits_delayed_requests(proxy: Proxy, client: httpx.Client) -> None:
    rule = proxy.delay(r"^/v2/$", 0.3, times=1)
    t0 = time.monotonic()
    client.get(f"{proxy.url}/v2/")
    assert time.monotonic() - t0 >= 0.3
    client.get(f"{proxy.url}/v2/")
    assert rule.applied == 1 and not rule.active  # the second one was not held


def test_ignore_range_answers_whole_blob(proxy: Proxy, client: httpx.Client) -> None:
    data = os.urandom(40_000)
    digest = push_blob(client, proxy.url, data)
    url = blob_url(proxy.url, digest)
    proxy.ignore_range(r"/blobs/", times=1)
    proxy.corrupt(digest, offset=15)
    whole = client.get(url, headers={"Range": "bytes=10-19"})
    assert whole.status_code == 200 and "content-range" not in whole.headers
    assert len(whole.content) == len(data) and whole.content[15] == data[15] ^ 0xFF
    assert proxy.gets(digest)[-1].fault == "corrupt"  # last fault to shape the body wins
    ranged = client.get(url, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content[5] == data[15] ^ 0xFF
    assert proxy.bytes_sent(digest) == len(data) + 10
