"""The registry transport: retries, resume, Range oddities, redirects, timeouts, foreign layers.

Two tiers. Protocol edge cases run against ``httpx.MockTransport`` with trio's autojump clock, so
backoff and ``Retry-After`` cost no wall time and their bounds can be asserted exactly. Then the
same behaviours through the fault-injecting proxy in front of the real ``docker-registry``,
mostly through a real mount read with ``sha256sum``; every one of those is bounded by an alarm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from typing import Callable

import httpx
import pytest
import trio

from imagefs.descriptors import OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor
from imagefs.errors import DigestMismatch, NotFound, RegistryError, RegistryUnreachable
from imagefs.reference import parse
from imagefs.registry.client import RegistryClient
from imagefs.registry.retry import FETCH, RESOLVE, RetryPolicy, parse_retry_after
from tests.support import Proxy
from tests.support.mounting import Mount

TEST_TIME_LIMIT = 30  # seconds; a hang fails the test instead of the run
AMD64 = ("--platform", "linux/amd64")
REF = parse("registry.test/test/x:v1")




# -- a scripted registry for MockTransport -------------------------------------------------------


class CutStream(httpx.AsyncByteStream):
    """A body that stops after ``after`` bytes with a connection reset (or ``error``)."""

    def __init__(self, data: bytes, after: int, error: Exception | None = None) -> None:
        self.data, self.after = data, after
        self.error = error or httpx.ReadError("[Errno 104] Connection reset by peer")

    async def __aiter__(self):
        if self.after:
            yield self.data[: self.after]
        raise self.error


class Blobs:
    """A MockTransport handler serving blobs by digest, honouring Range unless told not to.

    ``script`` holds one entry per request to come: None serves normally, a callable answers
    instead (it may raise an httpx error). ``cut_after`` cuts that many normal answers.
    """

    def __init__(self, *blobs: bytes, ignore_range: bool = False) -> None:
        self.blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in blobs}
        self.ignore_range = ignore_range
        self.script: list[Callable[[httpx.Request], httpx.Response] | None] = []
        self.cuts: list[int] = []
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        action = self.script.pop(0) if self.script else None
        if action is not None:
            return action(request)
        return self.serve(request)

    def serve(self, request: httpx.Request) -> httpx.Response:
        digest = request.url.path.rsplit("/", 1)[1]
        data = self.blobs.get(digest)
        if data is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]})
        status, body, headers = 200, data, {"Docker-Content-Digest": digest}
        rng = request.headers.get("range")
        if rng and not self.ignore_range:
            a, b = (int(x) for x in rng.split("=")[1].split("-"))
            status, body = 206, data[a : b + 1]
            headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        if self.cuts:
            return httpx.Response(status, headers=headers, stream=CutStream(body, self.cuts.pop(0)))
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))

    def ranges(self) -> list[str | None]:
        return [r.headers.get("range") for r in self.requests]


def layer(data: bytes, urls: tuple[str, ...] = ()) -> Descriptor:
    return Descriptor(OCI_LAYER_GZIP, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), urls=urls)


def mock_client(handler, **kw) -> RegistryClient:
    return RegistryClient(REF, transport=httpx.MockTransport(handler), **kw)


async def read(client: RegistryClient, desc: Descriptor, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray()
    async with client.open(desc, start, end) as chunks:
        async for chunk in chunks:
            out += chunk
    return bytes(out)


def answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, headers=headers or {}, content=body)


def fail(error: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def raise_(request: httpx.Request) -> httpx.Response:
        raise error

    return raise_


DATA = random.Random(1).randbytes(10_000)


# -- Retry-After ----------------------------------------------------------------------------------


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    date = format_datetime(datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=42), usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(42.0)
    past = format_datetime(datetime.fromtimestamp(now, timezone.utc) - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad, now=now) is None, bad


async def test_429_waits_for_retry_after_then_succeeds(autojump_clock):
    blobs = Blobs(DATA)
    blobs.script = [answer(429, {"Retry-After": "3"}), answer(429, {"Retry-After": "2"})]
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA)) == DATA
    assert len(blobs.requests) == 3
    gaps = [b - a for a, b in zip(blobs.times, blobs.times[1:])]
    assert gaps[0] == pytest.approx(3.0, abs=0.01) and gaps[1] == pytest.approx(2.0, abs=0.01)


async def test_429_with_http_date_retry_after(autojump_clock):
    blobs = Blobs(DATA)
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=4), usegmt=True)
    blobs.script = [answer(429, {"Retry-After": when})]
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA)) == DATA
    assert 2.5 <= blobs.times[1] - blobs.times[0] <= 4.5


async def test_retry_after_beyond_the_cap_fails_at_once(autojump_clock):
    blobs = Blobs(DATA)
    blobs.script = [answer(429, {"Retry-After": "3600"})] * 3
    start = trio.current_time()
    async with mock_client(blobs) as client:
        with pytest.raises(RegistryError, match=r"rate limited.*retry after 3600 s"):
            await read(client, layer(DATA))
    assert len(blobs.requests) == 1 and trio.current_time() - start < 1


# -- bounded retries ------------------------------------------------------------------------------


async def test_503_burst_then_success_and_the_count_is_bounded(autojump_clock):
    blobs = Blobs(DATA)
    blobs.script = [answer(503)] * 3
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA)) == DATA
    assert len(blobs.requests) == 4

    blobs = Blobs(DATA)
    blobs.script = [answer(503)] * 100
    start = trio.current_time()
    async with mock_client(blobs) as client:
        with pytest.raises(RegistryUnreachable, match="gave up after 5 attempts"):
            await read(client, layer(DATA))
    assert len(blobs.requests) == FETCH.attempts
    # equal jitter: each wait is between half and all of base * 2**n
    waits = [b - a for a, b in zip(blobs.times, blobs.times[1:])]
    for n, wait in enumerate(waits):
        step = min(FETCH.cap, FETCH.base * 2**n)
        assert step / 2 - 1e-6 <= wait <= step + 1e-6, (n, wait)
    assert trio.current_time() - start <= sum(min(FETCH.cap, FETCH.base * 2**n) for n in range(FETCH.attempts))


async def test_retries_are_bounded_in_time(autojump_clock):
    blobs = Blobs(DATA)
    blobs.script = [answer(500)] * 1000
    policy = RetryPolicy(attempts=1000, base=0.5, cap=1.0, budget=4.0)
    start = trio.current_time()
    async with mock_client(blobs, retry=policy) as client:
        with pytest.raises(RegistryError, match="registry answered 500"):
            await read(client, layer(DATA))
    assert trio.current_time() - start <= 4.0
    assert 4 <= len(blobs.requests) <= 17


async def test_resolve_retries_5xx_briefly_then_is_unreachable(autojump_clock):
    blobs = Blobs()
    blobs.script = [answer(502)] * 100
    start = trio.current_time()
    async with mock_client(blobs) as client:
        with pytest.raises(RegistryUnreachable, match=r"^registry registry.test unavailable: .*502"):
            await client.resolve()
    assert len(blobs.requests) == RESOLVE.attempts
    assert trio.current_time() - start <= RESOLVE.budget
    assert {r.method for r in blobs.requests} == {"HEAD"}


async def test_timeouts_are_retried_and_end_in_an_error(autojump_clock):
    blobs = Blobs(DATA)
    blobs.script = [fail(httpx.ReadTimeout("timed out"))] * 100
    async with mock_client(blobs, timeout=7) as client:
        with pytest.raises(RegistryUnreachable, match="no answer within 7 s"):
            await read(client, layer(DATA))
    assert len(blobs.requests) == FETCH.attempts


async def test_refused_connections_are_not_retried(autojump_clock):
    blobs = Blobs(DATA)
    blobs.script = [fail(httpx.ConnectError("[Errno 111] Connection refused"))] * 10
    async with mock_client(blobs) as client:
        with pytest.raises(RegistryUnreachable, match="cannot reach registry registry.test"):
            await client.resolve()
    assert len(blobs.requests) == 1


async def test_a_get_that_succeeded_is_never_retried(autojump_clock):
    """Docker Hub counts manifest GETs: a whole answer, even a wrong one, is not asked again."""
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}).encode()
    other = manifest + b" "
    requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.method)
        return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=other)

    desc = Descriptor(OCI_MANIFEST, "sha256:" + hashlib.sha256(manifest).hexdigest(), len(manifest))
    async with mock_client(handler) as client:
        with pytest.raises(DigestMismatch):
            await client.fetch_manifest(desc)
    assert requests == ["GET"]


# -- resume ---------------------------------------------------------------------------------------


async def test_a_cut_stream_resumes_with_closed_ranges_from_where_it_stopped(autojump_clock):
    blobs = Blobs(DATA)
    blobs.cuts = [3000, 3000, 3000]
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA)) == DATA
    assert blobs.ranges() == [None, "bytes=3000-9999", "bytes=6000-9999", "bytes=9000-9999"]

    blobs = Blobs(DATA)
    blobs.cuts = [250, 1]
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA), 100, 1000) == DATA[100:1000]
    assert blobs.ranges() == ["bytes=100-999", "bytes=350-999", "bytes=351-999"]


async def test_progress_resets_the_count_but_a_dead_stream_ends(autojump_clock):
    # Ten cuts, each after some progress: more than `attempts`, and still a success.
    blobs = Blobs(DATA)
    blobs.cuts = [900] * 10
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA)) == DATA
    assert len(blobs.requests) == 11
    # Cuts with no progress at all: bounded.
    blobs = Blobs(DATA)
    blobs.cuts = [0] * 100
    async with mock_client(blobs) as client:
        with pytest.raises(RegistryError, match="connection lost at byte 0"):
            await read(client, layer(DATA))
    assert len(blobs.requests) == FETCH.attempts


async def test_a_server_that_ignores_range_still_gives_the_right_bytes(autojump_clock):
    blobs = Blobs(DATA, ignore_range=True)
    blobs.cuts = [4000]
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA)) == DATA
        assert await read(client, layer(DATA), 5000, 5100) == DATA[5000:5100]
    assert blobs.ranges() == [None, "bytes=4000-9999", "bytes=5000-5099"]


async def test_a_206_wider_than_asked_is_trimmed(autojump_clock):
    def wide(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, headers={"Content-Range": f"bytes 0-9999/{len(DATA)}"}, stream=httpx.ByteStream(DATA))

    blobs = Blobs(DATA)
    blobs.script = [wide]
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA), 1234, 2345) == DATA[1234:2345]
    assert len(blobs.requests) == 1


async def test_416_is_asked_again_without_range(autojump_clock):
    # docker-registry's 416: a Content-Length its body does not fill, then a close.
    def odd_416(request: httpx.Request) -> httpx.Response:
        return httpx.Response(416, headers={"Content-Length": "1000", "Content-Range": f"bytes */{len(DATA)}"},
                              stream=CutStream(b"requested range not satisfiable\n", 33,
                                               httpx.RemoteProtocolError("peer closed connection")))

    blobs = Blobs(DATA)
    blobs.script = [odd_416]
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA), 500, 600) == DATA[500:600]
    assert blobs.ranges() == ["bytes=500-599", None]

    blobs = Blobs(DATA)
    blobs.script = [odd_416] * 10
    async with mock_client(blobs) as client:
        with pytest.raises(RegistryError, match="answered 416"):
            await read(client, layer(DATA), 500, 600)
    assert len(blobs.requests) == 2


async def test_a_blob_of_another_size_is_an_error_not_a_retry_loop(autojump_clock):
    blobs = Blobs(DATA)
    wrong = Descriptor(OCI_LAYER_GZIP, layer(DATA).digest, len(DATA) + 100)
    async with mock_client(blobs) as client:
        with pytest.raises(RegistryError, match=f"has {len(DATA)} bytes, the descriptor says {len(DATA) + 100}"):
            await read(client, wrong)
    assert len(blobs.requests) == 1


async def test_an_empty_range_costs_no_request(autojump_clock):
    blobs = Blobs(DATA)
    async with mock_client(blobs) as client:
        assert await read(client, layer(DATA), len(DATA)) == b""
        assert await read(client, Descriptor(OCI_LAYER_GZIP, layer(b"").digest, 0)) == b""
    assert blobs.requests == []


async def test_foreign_layer_comes_from_its_urls_when_the_registry_lacks_it(autojump_clock):
    foreign = DATA[:777]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "cdn.example":
            return httpx.Response(200, stream=httpx.ByteStream(foreign))
        return httpx.Response(404)

    desc = layer(foreign, urls=("ftp://nope.example/x", "https://cdn.example/layers/x.tar.gz?sig=abc"))
    async with mock_client(handler) as client:
        assert await read(client, desc) == foreign
    assert seen == [f"https://registry.test/v2/test/x/blobs/{desc.digest}", "https://cdn.example/layers/x.tar.gz?sig=abc"]


async def test_rate_limit_headers_are_logged_at_debug(caplog):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600",
                                            "Docker-Content-Digest": "sha256:" + "a" * 64, "Content-Length": "10",
                                            "Content-Type": OCI_MANIFEST})

    with caplog.at_level(logging.DEBUG, logger="imagefs"):
        async with mock_client(handler) as client:
            await client.resolve()
    assert "ratelimit-remaining 76;w=21600, ratelimit-limit 100;w=21600" in caplog.text


# -- through the fault proxy, against the real registry ------------------------------------------


def sha256sum(path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True, timeout=20).stdout.split()[0]


def blob_path(m: Mount, kind: str, digest: str):
    return m.path(f"{kind}-{digest}", "blob")


def test_cuts_at_random_offsets_resume_and_refetch_little(proxy, images, mnt, cache_dir):
    seed = int(os.environ.get("IMAGEFS_TEST_SEED", time.time()))
    rng = random.Random(seed)
    amd = images.amd
    blobs = [("config", amd.config), *[("layer", b) for b in amd.layers]]
    cuts = {}
    for _, blob in blobs:
        cuts[blob.digest] = proxy.cut(blob.digest, after=rng.randrange(1, max(2, min(blob.size, 400_000))), times=3)
    manifest_cut = proxy.cut(amd.digest, after=rng.randrange(1, amd.manifest.size), times=1)
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--debug") as m:
        assert manifest_cut.applied == 1, "the manifest fetched at mount was cut, and the mount still came up"
        for kind, blob in blobs:
            assert sha256sum(blob_path(m, kind, blob.digest)) == blob.digest.split(":")[1], (seed, kind, cuts[blob.digest])
            refetched = proxy.bytes_sent(blob.digest) - blob.size
            assert 0 <= refetched < 64 * 1024, (seed, blob.digest, refetched, cuts[blob.digest])
        assert sum(c.applied for c in cuts.values()) >= 4
        assert "connection lost at byte" in m.log_text()
    # a resumed request asks a closed range, from where the cut one stopped
    for _, blob in blobs:
        for hit in proxy.gets(blob.digest):
            assert re.fullmatch(r"bytes=\d+-\d+", hit.request_headers.get("range", "bytes=0-0")), (seed, hit)


def test_429_with_retry_after_then_success(proxy, images, mnt, cache_dir):
    shared = images.shared
    proxy.respond(r"/manifests/v1$", 429, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}', {"Retry-After": "1"}, times=1)
    proxy.respond(rf"/blobs/{shared.digest}", 429, headers={"Retry-After": "1"}, times=1)
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--debug") as m:
        assert sha256sum(blob_path(m, "layer", shared.digest)) == shared.digest.split(":")[1]
        hits = proxy.matching(shared.digest)
        limited = [h for h in hits if h.status == 429]
        assert len(limited) == 1
        for h in limited:  # the same request came back no sooner than Retry-After said
            again = [g for g in hits if g.started > h.finished and g.request_headers.get("range") == h.request_headers.get("range")]
            assert again and again[0].started - h.finished >= 0.95
        heads = proxy.matching("/manifests/v1", "HEAD")
        assert [h.status for h in heads] == [429, 200]
        assert "rate limited by the registry (429)" in m.log_text()


def test_503_bursts_then_success(proxy, images, mnt, cache_dir):
    layer_ = images.amd.layers[-1]
    proxy.respond(r"/manifests/v1$", 503, headers={"Retry-After": "0"}, times=2, method="HEAD")
    proxy.respond(rf"/blobs/{layer_.digest}", 503, b'{"errors":[{"code":"UNAVAILABLE"}]}', times=3)
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--debug") as m:
        assert "using sha256:" not in m.log_text(), "resolved by the registry, not the remembered tag"
        assert sha256sum(blob_path(m, "layer", layer_.digest)) == layer_.digest.split(":")[1]
        statuses = [h.status for h in proxy.matching(layer_.digest)]
        assert statuses[:3] == [503, 503, 503] and statuses[3] in (200, 206)
        assert "retry 3 of 4" in m.log_text()


def test_a_registry_that_stays_down_ends_a_read_in_eio_with_a_log_line(proxy, images, mnt, cache_dir):
    layer_ = images.amd.layers[0]
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64) as m:
        proxy.respond(rf"/blobs/{layer_.digest}", 503)
        started = time.monotonic()
        done = subprocess.run(["cat", str(blob_path(m, "layer", layer_.digest))], capture_output=True, timeout=20)
        assert done.returncode != 0 and b"Input/output error" in done.stderr
        assert time.monotonic() - started < 10
        assert "gave up after 5 attempts" in m.log_text() and layer_.digest in m.log_text()
        proxy.clear_faults()
        assert sha256sum(blob_path(m, "layer", layer_.digest)) == layer_.digest.split(":")[1]


def test_a_range_ignoring_server_still_gives_the_right_bytes(proxy, images, mnt, cache_dir):
    shared = images.shared
    proxy.ignore_range(r"/blobs/")
    cut = proxy.cut(shared.digest, after=700_000, times=2)
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--debug") as m:
        assert sha256sum(blob_path(m, "layer", shared.digest)) == shared.digest.split(":")[1]
        with open(blob_path(m, "layer", images.amd.layers[-1].digest), "rb") as f:
            f.seek(10)
            assert f.read(5) == images.amd.layers[-1].data[10:15]
    assert cut.applied == 2
    assert any(h.fault in ("ignore-range", "cut") and h.status == 200 and "range" in h.request_headers
               for h in proxy.gets(shared.digest)), "a ranged request was answered with the whole blob"
    assert "ignored Range" in m.log_text()


def test_a_stalled_answer_times_out_and_is_retried(proxy, images, mnt, cache_dir):
    layer_ = images.amd.layers[-1]
    with Mount(f"{proxy.host}/test/oci:v1", mnt, cache_dir, *AMD64, "--timeout", "1", "--debug") as m:
        stall = proxy.delay(rf"/blobs/{layer_.digest}", 2.0, times=1)
        started = time.monotonic()
        assert sha256sum(blob_path(m, "layer", layer_.digest)) == layer_.digest.split(":")[1]
        assert 1.0 <= time.monotonic() - started < 8
        assert stall.applied == 1
        assert "no answer within 1 s (ReadTimeout)" in m.log_text()
    # the proxy records the stalled request once its delay is over: let it land in this test
    deadline = time.monotonic() + 5
    while len(proxy.gets(layer_.digest)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(proxy.gets(layer_.digest)) == 2


def challenge_then_redirect(proxy, cdn, digest: str, token: str) -> None:
    """The registry asks once for a bearer ``token`` (served at ``/token``), then sends every GET
    of the blob to ``cdn`` with a signed URL, as Docker Hub does with its CDN."""
    blob_url = rf"/v2/test/oci/blobs/{digest}"
    proxy.respond(r"^/token\b", 200, json.dumps({"token": token, "expires_in": 300}).encode(),
                  {"Content-Type": "application/json"})
    challenge = f'Bearer realm="{proxy.url}/token",service="imagefs-test",scope="repository:test/oci:pull"'
    proxy.respond(blob_url, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge}, times=1)
    proxy.respond(blob_url, 307, headers={"Location": f"{cdn.url}/v2/test/oci/blobs/{digest}?sig=s3cr3t-sig"})


async def test_redirect_to_a_cdn_keeps_range_and_drops_authorization(registry, proxy, images, caplog):
    shared = images.shared
    token = "imagefs-test-token-9f8e7d"
    with Proxy(registry.host) as cdn:
        challenge_then_redirect(proxy, cdn, shared.digest, token)
        cdn.cut(shared.digest, after=1_000_000, times=1)
        desc = Descriptor(OCI_LAYER_GZIP, shared.digest, shared.size)
        with caplog.at_level(logging.DEBUG):
            async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
                assert await read(client, desc) == shared.data
                assert await read(client, desc, 5, 10) == shared.data[5:10]
        at_registry = proxy.gets(shared.digest)
        assert [h.status for h in at_registry] == [401, 307, 307, 307]
        assert all(h.request_headers.get("authorization") == f"Bearer {token}" for h in at_registry[1:])
        at_cdn = cdn.gets(shared.digest)
        assert len(at_cdn) == 3
        assert all("authorization" not in h.request_headers for h in at_cdn)
        assert [h.request_headers.get("range") for h in at_cdn] == [None, f"bytes=1000000-{shared.size - 1}", "bytes=5-9"]
        assert cdn.bytes_sent(shared.digest) == shared.size + 5
    assert token not in caplog.text and "s3cr3t-sig" not in caplog.text
    assert f"{cdn.url}/v2/test/oci/blobs/{shared.digest}?…" in caplog.text, "httpx logged the hop, without its query"


async def test_registry_416_for_a_wrong_size_is_a_clear_error_fast(proxy, images):
    blob = images.amd.layers[-1]
    wrong = Descriptor(OCI_LAYER_GZIP, blob.digest, blob.size + 100)
    started = time.monotonic()
    async with RegistryClient(parse(f"{proxy.host}/test/oci:v1")) as client:
        with pytest.raises(RegistryError, match=f"has {blob.size} bytes, the descriptor says {blob.size + 100}"):
            await read(client, wrong, blob.size)
        with pytest.raises(NotFound):
            await read(client, layer(b"not in the registry"))
    assert time.monotonic() - started < 5
    hits = proxy.gets(blob.digest)
    assert [(h.status, h.fault) for h in hits] == [(416, "upstream-short"), (200, None)]
