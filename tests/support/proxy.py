"""A counting, fault-injecting HTTP/1.1 reverse proxy for registry tests.

Why: the package must fetch *only* the bytes it needs and must survive a
misbehaving network.  Putting this proxy between the code under test and a
real ``docker-registry`` lets a test

* count what was fetched (:attr:`Proxy.hits`, :meth:`Proxy.bytes_sent`,
  :meth:`Proxy.gets`), e.g. "reading one file fetched < 1 MiB of the layer";
* inject faults: flip a byte (:meth:`Proxy.corrupt`), answer without the
  registry (:meth:`Proxy.respond`: 429/503 bursts, schema1 manifests...),
  kill a body mid-read (:meth:`Proxy.cut`), slow things down
  (:meth:`Proxy.delay`).

Design notes:

* stdlib only (``http.server`` + ``http.client``), one thread per client
  connection, one fresh upstream connection per request (so a registry
  restart never leaves the proxy holding a stale upstream socket);
* bodies are streamed in chunks in both directions, never buffered whole;
* keep-alive to the client is kept whenever the framing allows: an upstream
  ``Content-Length`` is passed through, a close-delimited or chunked upstream
  body is re-sent chunked;
* a hit is appended to :attr:`Proxy.hits` *before* the last byte of its
  response is written, so once a client has read a whole response the hit is
  already visible (no sleeps needed in tests);
* ``Location`` headers naming the upstream are rewritten to the proxy, so
  blob uploads (POST, then PATCH/PUT to ``Location``) go through the proxy.
  The upstream sees ``Host: <upstream>``, which is why it would otherwise
  hand out its own address.
"""

from __future__ import annotations

import array
import fcntl
import http.client
import logging
import re
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["Fault", "Hit", "Proxy"]

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
#: Upstream socket timeout; generous because ``delay`` may be used upstream too.
UPSTREAM_TIMEOUT = 30.0
#: Idle keep-alive timeout for client connections.
CLIENT_TIMEOUT = 60.0

# RFC 9110 7.6.1 hop-by-hop headers, plus ones we re-frame ourselves.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_DIGEST_IN_PATH = re.compile(r"/(blobs|manifests)/([A-Za-z0-9_+.-]+:[A-Fa-f0-9]{32,})$")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass
class Hit:
    """One request as seen by the proxy, recorded when its response completes.

    ``request_headers`` has lower-cased names (clients differ in case).
    ``body_bytes`` counts response body bytes actually written to the client
    (0 for HEAD).  ``fault`` names the injected fault that shaped the response
    (``"respond"``, ``"cut"``, ``"corrupt"``, ``"ignore-range"``, ``"upstream-error"``,
    ``"upstream-short"``) or is ``None``.
    """

    method: str
    path: str
    status: int
    request_headers: dict[str, str]
    body_bytes: int
    fault: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


class Fault:
    """Handle returned by every fault setter; ``clear()`` removes just this rule.

    ``applied`` counts how many responses the rule actually changed.
    ``times`` (where supported) limits that count; the rule then goes inert.
    """

    def __init__(self, proxy: Proxy, kind: str, *, times: int | None = None, **params: Any) -> None:
        self.proxy = proxy
        self.kind = kind
        self.params = params
        self.times = times
        self.applied = 0

    @property
    def active(self) -> bool:
        return self.times is None or self.applied < self.times

    def clear(self) -> None:
        self.proxy._remove_fault(self)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"<Fault {self.kind}({params}) applied={self.applied} times={self.times}>"


def _path_only(path: str) -> str:
    return path.split("?", 1)[0]


def _digest_of(path: str) -> str | None:
    match = _DIGEST_IN_PATH.search(_path_only(path))
    return match.group(2) if match else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    proxy: Proxy


class _Handler(BaseHTTPRequestHandler):
    """Per-connection handler; all state and policy live on :class:`Proxy`."""

    protocol_version = "HTTP/1.1"
    timeout = CLIENT_TIMEOUT
    server: _Server

    _hit: Hit
    _committed: bool

    # -- plumbing ------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.proxy._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("proxy %s: " + format, self.address_string(), *args)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, socket.timeout) as exc:
            log.debug("proxy: client connection ended: %r", exc)
            self.close_connection = True

    # -- request side --------------------------------------------------------

    def _request_body(self) -> tuple[Iterator[bytes] | None, bool, int | None]:
        """(chunk iterator or None, client used chunked?, content length)."""
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            return self._read_chunked(), True, None
        cl = self.headers.get("Content-Length")
        if cl is not None:
            length = int(cl)
            return self._read_exact(length), False, length
        return None, False, None

    def _read_exact(self, length: int) -> Iterator[bytes]:
        remaining = length
        while remaining > 0:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                raise ConnectionError("client closed during request body")
            remaining -= len(data)
            yield data

    def _read_chunked(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionError("client closed during chunked body")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers (ignored) up to the terminating blank line.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield from self._read_exact(size)
            self.rfile.readline(3)  # CRLF after the chunk data

    # -- dispatch ------------------------------------------------------------

    def _handle(self) -> None:
        proxy = self.server.proxy
        path = self.path
        if path.startswith(("http://", "https://")):  # absolute-form, tolerate it
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        self._hit = Hit(
            method=self.command,
            path=path,
            status=0,
            request_headers={k.lower(): v for k, v in self.headers.items()},
            body_bytes=0,
        )
        self._committed = False
        try:
            delay = proxy._delay_for(self.command, path)
            if delay > 0:
                proxy._stopping.wait(delay)
            canned = proxy._take_respond(self.command, path)
            if canned is not None:
                self._send_canned(canned)
            else:
                self._forward(path)
        except (ConnectionError, TimeoutError, socket.timeout) as exc:
            log.debug("proxy: %s %s aborted: %r", self.command, path, exc)
            self.close_connection = True
        finally:
            self._commit()

    # http.server dispatches on do_<METHOD>; every method takes the same path.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _commit(self) -> None:
        """Publish the hit (idempotent); called before the final write."""
        if not self._committed:
            self._committed = True
            self._hit.finished = time.monotonic()
            self.server.proxy._record(self._hit)

    def _drain_request_body(self) -> None:
        body, _, _ = self._request_body()
        if body is not None:
            for _ in body:
                pass

    # -- canned answers ------------------------------------------------------

    def _send_canned(self, rule: Fault) -> None:
        self._drain_request_body()
        status: int = rule.params["status"]
        body: bytes = rule.params["body"]
        headers: Mapping[str, str] = rule.params["headers"]
        self._hit.status = status
        self._hit.fault = "respond"
        self.send_response_only(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        if not any(name.lower() == "content-length" for name in headers):
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        send_body = self.command != "HEAD" and status not in (204, 304) and status >= 200
        self._hit.body_bytes = len(body) if send_body else 0
        self._commit()
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    # -- forwarding ----------------------------------------------------------

    def _forward(self, path: str) -> None:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy.upstream_hostname, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT)
        try:
            drop_range = proxy._take_ignore_range(self.command, path)
            if drop_range:
                self._hit.fault = "ignore-range"
            try:
                resp = self._send_upstream(conn, path, drop_range)
            except (OSError, http.client.HTTPException) as exc:
                self._upstream_error(exc)
                return
            self._relay(resp, path)
        finally:
            conn.close()

    def _send_upstream(self, conn: http.client.HTTPConnection, path: str, drop_range: bool = False) -> http.client.HTTPResponse:
        proxy = self.server.proxy
        body, chunked, length = self._request_body()
        conn.putrequest(self.command, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", proxy.upstream)
        for name, value in self.headers.items():
            lname = name.lower()
            # Expect was already answered by http.server (100 Continue).
            if lname in _HOP_BY_HOP or lname in ("host", "content-length", "expect"):
                continue
            if drop_range and lname in ("range", "if-range"):
                continue
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif length is not None:
            conn.putheader("Content-Length", str(length))
        conn.endheaders()
        if body is not None:
            for data in body:
                conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                conn.send(b"0\r\n\r\n")
        return conn.getresponse()

    def _upstream_error(self, exc: BaseException) -> None:
        log.debug("proxy: upstream error for %s %s: %r", self.command, self.path, exc)
        body = f"imagefs test proxy: upstream error: {exc!r}\n".encode()
        self._hit.status = 502
        self._hit.fault = "upstream-error"
        self.send_response_only(502)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.close_connection = True
        send_body = self.command != "HEAD"
        self._hit.body_bytes = len(body) if send_body else 0
        self._commit()
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _relay(self, resp: http.client.HTTPResponse, path: str) -> None:
        proxy = self.server.proxy
        status = resp.status
        self._hit.status = status
        no_body = self.command == "HEAD" or status in (204, 304) or status < 200
        upstream_length = resp.getheader("Content-Length")

        self.send_response_only(status, resp.reason)
        for name, value in resp.getheaders():
            lname = name.lower()
            if lname in _HOP_BY_HOP:
                continue
            if lname == "location":
                value = proxy._rewrite_location(value)
            self.send_header(name, value)
        rechunk = False
        if not no_body and upstream_length is None:
            if self.request_version >= "HTTP/1.1":
                rechunk = True
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")

        if no_body or upstream_length == "0":
            # Nothing follows the headers, so the hit must be published now:
            # the client considers the response complete once it has them.
            self._commit()
            self.end_headers()
            return
        self.end_headers()

        # Which digest-bound faults apply to this body, and where does it start?
        digest = _digest_of(path)
        header_digest = resp.getheader("Docker-Content-Digest")
        digests = {d for d in (digest, header_digest) if d}
        start = 0
        content_range = resp.getheader("Content-Range")
        if status == 206 and content_range:
            m = _CONTENT_RANGE.match(content_range)
            start = int(m.group(1)) if m else 0
        multipart = (resp.getheader("Content-Type") or "").startswith("multipart/")
        corrupt_rules: list[Fault] = []
        cut_rule: Fault | None = None
        if self.command == "GET" and status in (200, 206) and digests:
            if not multipart:
                corrupt_rules = proxy._faults_of("corrupt", digests)
            cuts = proxy._faults_of("cut", digests)
            cut_rule = cuts[0] if cuts else None

        sent = 0
        corrupted = False
        while True:
            try:
                data = resp.read1(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                log.debug("proxy: upstream body failed: %r", exc)
                data = b""
            if not data:
                break
            last = upstream_length is not None and resp.length == 0
            if corrupt_rules:
                chunk_start = start + sent
                buf = bytearray(data)
                for rule in corrupt_rules:
                    offset = rule.params["offset"]
                    if chunk_start <= offset < chunk_start + len(buf):
                        buf[offset - chunk_start] ^= 0xFF
                        proxy._applied(rule)
                        corrupted = True
                data = bytes(buf)
            if corrupted:
                self._hit.fault = "corrupt"
            if cut_rule is not None and sent + len(data) > cut_rule.params["after"]:
                if proxy._applied(cut_rule):
                    keep = cut_rule.params["after"] - sent
                    self._write_body(data[:keep], rechunk)
                    sent += keep
                    self._hit.body_bytes = sent
                    self._hit.fault = "cut"
                    self._abort()
                    return
            if last:
                self._hit.body_bytes = sent + len(data)
                self._commit()
            try:
                self._write_body(data, rechunk)
            except OSError:
                self._hit.body_bytes = sent
                raise
            sent += len(data)
            self._hit.body_bytes = sent

        if upstream_length is not None and sent < int(upstream_length):
            # The upstream promised more than it sent (docker-registry does
            # this for 416 answers); mirror its orderly close (FIN, not RST)
            # so the client sees the same "incomplete body" as without us.
            self._hit.fault = self._hit.fault or "upstream-short"
            self._commit()
            self.close_connection = True
            return
        self._commit()
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")

    def _write_body(self, data: bytes, rechunk: bool) -> None:
        if not data:
            return
        if rechunk:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    def _abort(self) -> None:
        """Abortive close (RST) after the bytes written so far reached the peer.

        We wait for the kernel send queue to drain first: with SO_LINGER=0 the
        kernel would otherwise discard unsent data and the client would see
        fewer bytes than the hit claims.
        """
        self._commit()
        self.close_connection = True
        sock = self.connection
        deadline = time.monotonic() + 5.0
        buf = array.array("i", [0])
        while time.monotonic() < deadline:
            try:
                fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf, True)
            except OSError:
                break
            if buf[0] == 0:
                break
            time.sleep(0.001)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        # rfile holds a reference to the socket; both must go for the fd to close.
        self.rfile.close()
        sock.close()


class Proxy:
    """Reverse proxy in a background thread in front of ``upstream`` (``host:port``).

    Faults are rules matched per request; setters return a :class:`Fault`
    handle whose ``clear()`` removes that rule, and :meth:`clear_faults`
    removes them all.  :meth:`reset` forgets recorded hits (not faults).
    """

    def __init__(self, upstream: str, *, port: int = 0) -> None:
        upstream = re.sub(r"^https?://", "", upstream).rstrip("/")
        self.upstream = upstream
        hostname, _, port_text = upstream.rpartition(":")
        self.upstream_hostname = hostname or upstream
        self.upstream_port = int(port_text) if hostname else 80
        self._requested_port = port
        self.hits: list[Hit] = []
        self._reset_at = 0.0  # requests started before the last reset() are not recorded
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.port: int = port

    # -- addresses -----------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` of the proxy (valid after :meth:`start`)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("proxy already running")
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"imagefs-test-proxy:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, and drop open keep-alive connections so clients notice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Proxy {self.url} -> {self.upstream} hits={len(self.hits)} faults={len(self._faults)}>"

    # -- observation ---------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded hits (faults stay), and never record a request that started before now:
        one an earlier test left in flight (stalled, or writing a body nobody reads) is not this one's."""
        with self._lock:
            del self.hits[:]
            self._reset_at = time.monotonic()

    def matching(self, pattern: str, method: str | None = None) -> list[Hit]:
        """Hits whose path contains ``pattern`` (and whose method is ``method``)."""
        with self._lock:
            hits = list(self.hits)
        return [h for h in hits if pattern in h.path and (method is None or h.method == method)]

    def gets(self, pattern: str) -> list[Hit]:
        """GET hits whose path contains ``pattern`` (e.g. ``"/manifests/"``)."""
        return self.matching(pattern, "GET")

    def bytes_sent(self, digest: str) -> int:
        """Total body bytes sent to clients for ``GET .../blobs/<digest>``."""
        suffix = f"/blobs/{digest}"
        with self._lock:
            hits = list(self.hits)
        return sum(h.body_bytes for h in hits if h.method == "GET" and _path_only(h.path).endswith(suffix))

    # -- faults --------------------------------------------------------------

    def corrupt(self, digest: str, offset: int = 0) -> Fault:
        """Flip (XOR 0xFF) the byte at ``offset`` of the content for ``digest``.

        Applies to GET responses for ``blobs/<digest>`` and
        ``manifests/<digest>``, and to any GET whose ``Docker-Content-Digest``
        is ``digest`` (a manifest fetched by tag).  ``offset`` is relative to
        the whole blob: a ``Range`` answer is changed only if it covers it.
        Multipart (multi-range) answers are left alone.
        """
        return self._add(Fault(self, "corrupt", digest=digest, offset=offset))

    def respond(
        self,
        path_regex: str,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        times: int | None = None,
        method: str | None = None,
    ) -> Fault:
        """Answer requests whose path (with query) matches ``path_regex`` (``re.search``) ourselves.

        ``Content-Length`` is added unless given.  With ``times`` the rule
        answers that many requests and then lets requests pass through.
        ``method`` restricts it to one method (e.g. ``"GET"``).  The first
        active matching rule (in order of creation) wins.
        """
        return self._add(
            Fault(
                self,
                "respond",
                times=times,
                pattern=re.compile(path_regex),
                status=status,
                body=bytes(body),
                headers=dict(headers or {}),
                method=method.upper() if method else None,
            )
        )

    def cut(self, digest: str, after: int, *, times: int | None = None) -> Fault:
        """Send ``after`` body bytes of a GET for ``digest``, then reset the connection.

        ``after`` counts bytes of *this response* (so for a Range request it
        is relative to the range start).  Responses no longer than ``after``
        pass intact.  ``times`` limits how many responses get cut, which lets
        a resume-with-Range retry succeed.
        """
        return self._add(Fault(self, "cut", times=times, digest=digest, after=after))

    def delay(self, path_regex: str, seconds: float, *, method: str | None = None, times: int | None = None) -> Fault:
        """Wait ``seconds`` before handling matching requests (time to first byte).

        Delays of several matching rules add up.  Stopping the proxy cuts
        the wait short.  With ``times`` only that many requests are delayed.
        """
        return self._add(
            Fault(
                self,
                "delay",
                times=times,
                pattern=re.compile(path_regex),
                seconds=seconds,
                method=method.upper() if method else None,
            )
        )

    def ignore_range(self, path_regex: str, *, times: int | None = None) -> Fault:
        """Forward matching requests without their ``Range`` (and ``If-Range``) header.

        The registry then answers 200 with the whole body, as a server or CDN that does not
        support ranges would; ``cut``/``corrupt`` offsets stay relative to the whole blob.
        """
        return self._add(Fault(self, "ignore-range", times=times, pattern=re.compile(path_regex)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    # -- internals used by the handler --------------------------------------

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def _remove_fault(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def _applied(self, fault: Fault) -> bool:
        """Count one application; False if the rule ran out of ``times``."""
        with self._lock:
            if not fault.active:
                return False
            fault.applied += 1
            return True

    def _faults_of(self, kind: str, digests: set[str]) -> list[Fault]:
        with self._lock:
            return [f for f in self._faults if f.kind == kind and f.active and f.params["digest"] in digests]

    def _delay_for(self, method: str, path: str) -> float:
        total = 0.0
        with self._lock:
            for f in self._faults:
                if f.kind != "delay" or not f.active or (f.params["method"] and f.params["method"] != method):
                    continue
                if f.params["pattern"].search(path):
                    f.applied += 1
                    total += f.params["seconds"]
        return total

    def _take_ignore_range(self, method: str, path: str) -> bool:
        with self._lock:
            for f in self._faults:
                if f.kind == "ignore-range" and f.active and f.params["pattern"].search(path):
                    f.applied += 1
                    return True
        return False

    def _take_respond(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.kind != "respond" or not f.active:
                    continue
                if f.params["method"] and f.params["method"] != method:
                    continue
                if f.params["pattern"].search(path):
                    f.applied += 1
                    return f
        return None

    def _record(self, hit: Hit) -> None:
        with self._lock:
            if hit.started >= self._reset_at:
                self.hits.append(hit)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _rewrite_location(self, value: str) -> str:
        for scheme in ("http://", "https://"):
            prefix = scheme + self.upstream
            if value.startswith(prefix) and value[len(prefix) : len(prefix) + 1] in ("", "/", "?"):
                return "http://" + self.host + value[len(prefix) :]
        return value
