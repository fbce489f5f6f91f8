"""Blob bodies read off the trio thread: a tiny HTTP/1.1 client for ranges httpx has opened once.

Why: streaming a layer through httpx costs the one trio thread every byte twice (h11's receive
buffer appends and trims each read) plus a trip through h11, httpcore and trio's socket layer per
read; profiled on a cold ``cat`` that thread was ~82 % busy at a fifth of ``curl``'s speed, and it
is also the thread that answers FUSE. Here a worker thread reads the socket with ``recv_into``
straight into a chunk buffer of :data:`~.tuning.DIRECT_CHUNK` bytes, the GIL released throughout.

httpx keeps everything that needs judgement. The first request of each blob source goes through
it — auth challenges and tokens, redirects to a CDN, mirrors, retries, odd answers. When its answer
is a clean ``206`` for exactly the range asked, the final request (URL after redirects, headers
after auth) becomes a :class:`Recipe`, and later ranges of that source of at least
:data:`~.tuning.DIRECT_MIN` bytes are sent as the same request with another ``Range``. Anything but
the same clean answer (a token expired, a signed CDN URL gone stale, a host that ignores ``Range``,
a 5xx) raises :class:`Refused`, and the caller forgets the recipe and asks httpx again.

Not used with an HTTP proxy from the environment (httpx would go through it) nor with a custom
httpx transport (tests). Request headers hold credentials: nothing here logs them, and errors name
the origin only, never the URL (a CDN URL's query is a signature).
"""

from __future__ import annotations

import functools
import inspect
import socket
import ssl
import struct
import threading
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio
from outcome import Outcome

from .chunkpool import ChunkPool
from .tuning import DIRECT_BODIES, DIRECT_CHUNK, DIRECT_IDLE, FIRST_CHUNK

MAX_HEAD = 64 * 1024
POOL = 2 * DIRECT_BODIES + 16  # buffers kept: two per body, and what an ingest holds (32 MiB + 32 MiB)
GRAIN = 1 << 20  # chunks end on a multiple of this in the blob (or of their size, if smaller)
# Hop-by-hop or per-request headers a recipe does not replay.
_DROP = frozenset({b"host", b"range", b"connection", b"content-length", b"transfer-encoding", b"keep-alive", b"te"})
# A cancelled task must not wait for a stalled socket: trio >= 0.23 spells it abandon_on_cancel.
_ABANDON = ({"abandon_on_cancel": True} if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else {"cancellable": True})


class Refused(Exception):
    """The answer was not the clean ``206`` a recipe expects; httpx should ask instead."""


class Lost(Exception):
    """The connection failed in the middle of a body (the cause is the ``OSError``)."""


@dataclass(frozen=True)
class Recipe:
    """The request httpx ended up sending for one blob source, minus its ``Range``."""

    origin: str  # scheme://host:port, the key of the connection pool
    host: str
    port: int
    tls: ssl.SSLContext | None
    connect_timeout: float | None  # a host's own dial timeout (hosts.toml), else the client's
    target: bytes  # path and query
    headers: bytes  # "Name: value\r\n" lines, Host first


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    origin: str


def replay_tls(url: httpx.URL, tls: ssl.SSLContext | bool) -> ssl.SSLContext | None:
    """The TLS context a plain socket replaying httpx's request to ``url`` needs: httpx's own, or
    one that checks nothing where httpx was told not to (``--insecure``); None for plain HTTP."""
    if url.scheme != "https":
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def proxied(url: str) -> bool:
    """Whether httpx would send a request for ``url`` through a proxy from the environment."""
    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(url)
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(parts.hostname or "", proxies)


class DirectClient:
    """Recipes learned per blob source, and a few idle keep-alive connections per origin."""

    def __init__(self, *, timeout: float, connect_timeout: float) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._recipes: dict[str, Recipe] = {}
        self._idle: dict[str, list[_Conn]] = defaultdict(list)
        self.requests = 0  # sent on this path, for tests and statistics
        self.pool = ChunkPool(DIRECT_CHUNK, POOL)

    def learn(self, source: str, request: httpx.Request, tls: ssl.SSLContext | bool, connect_timeout: float | None = None) -> None:
        """Remember how httpx's ``request`` for ``source`` was sent, if a plain socket can replay it."""
        url = request.url
        if url.scheme not in ("http", "https") or proxied(str(url)):
            return
        context = replay_tls(url, tls)
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        lines = [b"Host: " + url.netloc]  # as httpx sent it: "host[:port]"
        lines += [k + b": " + v for k, v in request.headers.raw if k.lower() not in _DROP]
        self._recipes[source] = Recipe(f"{url.scheme}://{host}:{port}", host, port, context, connect_timeout,
                                       url.raw_path, b"".join(line + b"\r\n" for line in lines))

    def recipe(self, source: str) -> Recipe | None:
        """How to replay ``source``, if known and if another body fits in memory's bound."""
        return self._recipes.get(source) if self.pool.bodies < DIRECT_BODIES else None

    def forget(self, source: str) -> None:
        self._recipes.pop(source, None)

    async def get(self, recipe: Recipe, start: int, end: int, total: int) -> "Body":
        """Send ``Range: bytes=start-(end-1)``; the answer must be exactly that range of ``total``.

        Raises :class:`Refused` for any other answer and ``OSError`` if the host cannot be reached.
        """
        head = (b"GET " + recipe.target + b" HTTP/1.1\r\n" + recipe.headers
                + f"Range: bytes={start}-{end - 1}\r\nConnection: keep-alive\r\n\r\n".encode())
        idle = self._idle.get(recipe.origin)
        reused = idle.pop() if idle else None
        self.requests += 1
        cancelled = threading.Event()
        try:
            conn, leftover, keep = await trio.to_thread.run_sync(
                self._exchange, recipe, reused, head, (start, end, total), cancelled, **_ABANDON)
        except trio.Cancelled:
            cancelled.set()  # the worker closes whatever socket it ends up with
            raise
        return Body(self, conn, leftover, start, end, keep)

    def _exchange(self, recipe: Recipe, conn: _Conn | None, head: bytes, want: tuple[int, int, int],
                  cancelled: threading.Event) -> tuple[_Conn, bytearray, bool]:
        """Worker thread: send ``head`` (again on a fresh connection if a kept one was stale) and
        check the answer's head."""
        while True:
            fresh = conn is None
            if conn is None:
                conn = self._connect(recipe)
            try:
                conn.sock.sendall(head)
                status, headers, leftover = _read_head(conn.sock)
                break
            except (OSError, Refused):
                conn.sock.close()
                if fresh:
                    raise
                conn = None  # the server closed an idle connection: one more try, fresh
        try:
            if cancelled.is_set():
                raise Refused("cancelled")
            keep = _check(status, headers, *want)
        except BaseException:
            conn.sock.close()
            raise
        return conn, leftover, keep

    def _connect(self, recipe: Recipe) -> _Conn:
        sock = socket.create_connection((recipe.host, recipe.port), timeout=recipe.connect_timeout or self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if recipe.tls is not None:
                # TLS takes no MSG_WAITALL, and OpenSSL retries a blocking socket's EAGAIN, so the
                # kernel's receive timeout would never end a read: Python's own timeout does
                # (TimeoutError, "no answer within N s").
                sock = recipe.tls.wrap_socket(sock, server_hostname=recipe.host)
                sock.settimeout(self.timeout)
            else:
                # Blocking, with the kernel's own receive timeout: a Python socket timeout would
                # make the fd non-blocking, and MSG_WAITALL (one GIL release per chunk, not one
                # per segment) needs a blocking one. A timeout then ends recv early or with EAGAIN.
                sock.settimeout(None)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.timeout))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.timeout))
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, recipe.origin)

    def _release(self, conn: _Conn) -> None:
        idle = self._idle[conn.origin]
        if len(idle) < DIRECT_IDLE:
            idle.append(conn)
        else:
            conn.sock.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.sock.close()
        self._idle.clear()


class Body:
    """The rest of one ``206`` body, read in chunks in worker threads.

    One chunk is read ahead: while the caller writes chunk *k* to disk, a worker thread is already
    receiving chunk *k+1*, so the network and the disk overlap on two cores.
    """

    def __init__(self, client: DirectClient, conn: _Conn, leftover: bytearray, start: int, end: int, keep: bool) -> None:
        self.client = client
        self.conn: _Conn | None = conn
        self.leftover = leftover
        self.end = end  # the body is bytes [start, end) of the blob
        self.remaining = end - start  # bytes not yet handed to the caller
        self.chunk = FIRST_CHUNK  # doubles up to DIRECT_CHUNK: a reader waits for whole chunks
        self.keep = keep
        self.error: OSError | None = None
        self._pending: tuple[trio.Event, list[Outcome]] | None = None
        self._lock = threading.Lock()  # busy/aborted: who closes the socket when a read is abandoned
        self._busy = False
        self._aborted = False
        client.pool.opened()

    async def read(self) -> bytearray | memoryview:
        """The next chunk (at most :data:`DIRECT_CHUNK` bytes); ``Lost`` once the connection failed."""
        if self._pending is None:
            if self.error is not None or self.conn is None:
                raise Lost(str(self.error or "body closed")) from self.error
            self._start(self._next_size())
        assert self._pending is not None
        done, box = self._pending
        try:
            await done.wait()
        except trio.Cancelled:
            self.close()
            raise
        self._pending = None
        chunk = box[0].unwrap()
        self.remaining -= len(chunk)
        if not chunk:
            raise Lost(str(self.error)) from self.error
        if self.remaining == 0:
            self.close()
        elif self.error is None:
            self._start(self._next_size())
        return chunk

    def _next_size(self) -> int:
        """The next chunk's size: it ends on a multiple of itself in the blob, a MiB at most. So a
        range that starts off a page (a plain-tar member's tail) has every chunk but its first on
        a page, and the ingest can write them with ``O_DIRECT``."""
        n, self.chunk = self.chunk, min(self.chunk * 2, DIRECT_CHUNK)
        pos = self.end - self.remaining
        grain = min(n, GRAIN)
        end = (pos + n) // grain * grain
        return min(end - pos if end > pos else n, self.remaining)

    def _start(self, n: int) -> None:
        """Have a worker thread receive the next ``n`` bytes; :meth:`read` collects them."""
        assert self.conn is not None
        done, box = trio.Event(), []
        token = trio.lowlevel.current_trio_token()

        def deliver(outcome: Outcome) -> None:  # in the worker thread
            box.append(outcome)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._busy = True
        self._pending = (done, box)
        trio.lowlevel.start_thread_soon(functools.partial(self._read, self.conn, n), deliver)

    def _read(self, conn: _Conn, n: int) -> bytearray | memoryview:
        """Worker thread: fill a buffer (pooled); on a failure return what arrived and keep the error."""
        buf = self.client.pool.buffer(n)
        got = 0
        with memoryview(buf) as view:
            if self.leftover:
                got = min(n, len(self.leftover))
                view[:got] = self.leftover[:got]
                del self.leftover[:got]
            flags = 0 if isinstance(conn.sock, ssl.SSLSocket) else socket.MSG_WAITALL  # TLS takes no flags
            try:
                while got < n:
                    k = conn.sock.recv_into(view[got:], n - got, flags)
                    if k == 0:
                        raise ConnectionResetError("the registry closed the connection")
                    got += k
            except BlockingIOError as exc:  # SO_RCVTIMEO ran out with nothing received
                self.error = TimeoutError(f"no data within {self.client.timeout:g} s")
                self.error.__cause__ = exc
            except OSError as exc:
                self.error = exc
            finally:
                with self._lock:
                    self._busy = False
                    if self._aborted:
                        conn.sock.close()
        if got < n:  # rare: a copy, since a TLS error's traceback may still hold a view of buf
            buf = bytearray(buf[:got])
        return buf

    def close(self) -> None:
        """Keep the connection for the next range if this body was read whole, else drop it."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.client.pool.closed()
        if self.remaining == 0 and self.keep and self.error is None and not self.leftover:
            self.client._release(conn)
            return
        with self._lock:
            self._aborted = True
            if self._busy:  # a worker is in recv: wake it; it closes the socket when it returns
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        conn.sock.close()


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def _read_head(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytearray]:
    """Status, headers (lower-case names) and the body bytes that came with them."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEAD:
            raise Refused("response head too large")
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("the registry closed the connection before answering")
        buf += data
    lines = bytes(buf[:end]).split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise Refused("not an HTTP/1.x answer")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise Refused("malformed header line")
        name = name.strip().lower()
        if name in headers:  # a repeated header we care about is ambiguous: let httpx judge
            headers[name] = headers[name] + b"," + value.strip()
        else:
            headers[name] = value.strip()
    del buf[: end + 4]
    return int(parts[1]), headers, buf


def _check(status: int, headers: dict[bytes, bytes], start: int, end: int, total: int) -> bool:
    """Whether the connection may be kept; raises :class:`Refused` unless it is exactly our range."""
    if status != 206:
        raise Refused(f"answered {status}")
    if headers.get(b"content-range") != f"bytes {start}-{end - 1}/{total}".encode():
        raise Refused("answered another range")
    if headers.get(b"content-length") != str(end - start).encode() or b"transfer-encoding" in headers:
        raise Refused("unexpected body framing")
    if headers.get(b"content-encoding", b"identity").lower() != b"identity":
        raise Refused("body is encoded")
    return headers.get(b"connection", b"").lower() != b"close"
