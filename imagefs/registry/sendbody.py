"""Upload bodies sent off the trio thread: one ``PATCH`` on a plain socket, from a file or from chunks.

Why: sending a blob through httpx costs the one trio thread every byte (httpcore's writes, trio's
socket layer, and the Pusher's hashing all ran there), so while it sent it did not receive the
next bytes from SRC: the two transfers took turns. Here each step of the request runs in a worker
thread with the GIL released: a committed cache file goes with ``sendfile`` (no copy through
Python at all), and streamed chunks are hashed and sent by the worker while the trio thread
already receives the next ones.

httpx keeps everything that needs judgement. The ``POST`` that opens an upload goes through it
(the auth challenge, the token with the push scope, redirects); its final request becomes a
:class:`Route`: the origin and the headers it carried (``Authorization`` among them). Each
``PATCH`` of that upload to the same origin is then sent as the same request on its own
connection. The answer is returned whole (status, headers, a bounded body) for the caller to judge
as it judges httpx's; a ``401``/``403`` tells it to forget the route (a token that expired) and go
back to httpx. Not used through an HTTP proxy from the environment nor with a custom httpx
transport (tests). Request headers hold credentials: nothing here logs them, and errors name the
origin only.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import httpx
import trio

from .direct import proxied, replay_tls

__all__ = ["Route", "Answer", "Answered", "Patch", "ChunkReader", "route_of", "feed", "file_pieces", "hash_file"]

MAX_HEAD = 64 * 1024
#: Error bodies are read for the registry's message, never more than this.
MAX_BODY = 64 * 1024
#: One ``sendfile`` call, and how often progress is reported (and cancellation noticed) on that path.
FILE_PIECE = 16 << 20
#: One read of :func:`hash_file`.
HASH_PIECE = 4 << 20
#: Chunks of a streamed segment received ahead of the worker thread that sends them (up to 4 MiB each
#: from the direct path, so 16 MiB per transfer at most).
FEED_DEPTH = 4
#: One read of :func:`file_pieces` (a local file sent through httpx, when no route is known).
FILE_READ = 1 << 20
# Headers of httpx's request that a PATCH does not replay: it frames its own body.
_DROP = frozenset({b"host", b"connection", b"content-length", b"content-type", b"content-range",
                   b"transfer-encoding", b"keep-alive", b"te", b"expect"})
# A cancelled step must not wait for a stalled socket: trio >= 0.23 spells it abandon_on_cancel.
_ABANDON = ({"abandon_on_cancel": True} if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else {"cancellable": True})


@dataclass(frozen=True)
class Route:
    """How httpx reached the registry when it opened an upload: where, over what, with which headers."""

    origin: str  # scheme://host:port
    host: str
    port: int
    tls: ssl.SSLContext | None
    headers: bytes  # "Name: value\r\n" lines, Host first

    def serves(self, url: httpx.URL) -> bool:
        """Whether an upload at ``url`` is on this origin: the headers (a token) were issued for it."""
        return _origin(url) == self.origin


@dataclass(frozen=True)
class Answer:
    """The registry's answer to a PATCH, whole: the caller judges it as it judges httpx's."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class Answered(Exception):
    """The registry answered before taking the whole body (a refusal); ``answer`` is what it said."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"answered {answer.status} before the body ended")
        self.answer = answer


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"


def route_of(request: httpx.Request, tls: ssl.SSLContext | bool) -> Route | None:
    """The route ``request`` (as httpx finally sent it) took, if a plain socket can take it too."""
    url = request.url
    if url.scheme not in ("http", "https") or proxied(str(url)):
        return None
    context = replay_tls(url, tls)
    lines = [b"Host: " + url.netloc]
    lines += [k + b": " + v for k, v in request.headers.raw if k.lower() not in _DROP]
    return Route(_origin(url), url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80),
                 context, b"".join(line + b"\r\n" for line in lines))


class Patch:
    """One ``PATCH`` of ``n`` bytes at ``start`` to ``url``, on a connection of its own.

    :meth:`open` connects and sends the head; the body goes by :meth:`send` (chunks, hashed on the
    way when a hasher is given) or :meth:`send_file`; :meth:`answer` reads the registry's answer.
    Each step runs in a worker thread; a cancelled step shuts the socket, which ends the worker's
    call, and that worker closes it. :meth:`close` always.
    """

    def __init__(self, route: Route, url: httpx.URL, start: int, n: int, timeout: float) -> None:
        self.route, self.url, self.start, self.n, self.timeout = route, url, start, n, timeout
        self.sent = 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._busy = self._closed = False

    async def open(self) -> None:
        target = self.url.raw_path
        head = (b"PATCH " + target + b" HTTP/1.1\r\n" + self.route.headers
                + b"Content-Type: application/octet-stream\r\n"
                + f"Content-Length: {self.n}\r\nContent-Range: {self.start}-{self.start + self.n - 1}\r\n".encode()
                + b"Connection: close\r\n\r\n")
        await self._step(self._connect_and_send, head)

    async def send(self, data, hasher=None) -> None:
        """Send ``data`` (after feeding ``hasher``); more than ``n`` bytes in all is refused."""
        if self.sent + len(data) > self.n:
            raise OSError(f"{self.route.origin}: more body than the {self.n} bytes announced")
        await self._step(self._body, self._send, data, hasher)
        self.sent += len(data)

    async def send_file(self, fd: int, offset: int, count: int, progress=None) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset``, a piece at a time (``sendfile`` on plain sockets)."""
        while count > 0:
            k = min(FILE_PIECE, count, self.n - self.sent)
            if k <= 0:
                raise OSError(f"{self.route.origin}: more body than the {self.n} bytes announced")
            await self._step(self._body, self._sendfile, fd, offset, k)
            self.sent += k
            offset += k
            count -= k
            if progress is not None:
                progress(k)

    async def answer(self) -> Answer:
        if self.sent != self.n:
            raise OSError(f"{self.route.origin}: body ended at {self.sent} of {self.n} bytes")
        return await self._step(self._read_answer)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock = self._sock
            if sock is None:
                return
            if self._busy:  # a worker is in a call: wake it; it closes the socket when it returns
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self._sock = None
        sock.close()

    async def __aenter__(self) -> "Patch":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    # -- in worker threads ------------------------------------------------------------------------

    async def _step(self, fn, *args):
        with self._lock:
            if self._closed:
                raise OSError(f"{self.route.origin}: connection closed")
            self._busy = True
        try:
            return await trio.to_thread.run_sync(self._guarded, fn, *args, **_ABANDON)
        except trio.Cancelled:
            self.close()
            raise

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy = False
                if self._closed and self._sock is not None:
                    self._sock.close()
                    self._sock = None

    def _connect_and_send(self, head: bytes) -> None:
        r = self.route
        sock = socket.create_connection((r.host, r.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if r.tls is not None:
                sock = r.tls.wrap_socket(sock, server_hostname=r.host)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._sock = sock
        sock.sendall(head)

    def _body(self, fn, *args) -> None:
        """``fn(*args)``; if the registry hung up mid-body, its answer when it sent one (:class:`Answered`)."""
        try:
            fn(*args)
        except (BrokenPipeError, ConnectionResetError) as exc:
            try:
                answer = self._read_answer()
            except OSError:
                raise exc from None
            raise Answered(answer) from exc

    def _send(self, data, hasher) -> None:
        if hasher is not None:
            hasher.update(data)
        self._live().sendall(data)

    def _sendfile(self, fd: int, offset: int, count: int) -> None:
        sock = self._live()
        if isinstance(sock, ssl.SSLSocket):  # TLS: the bytes go through OpenSSL anyway
            with memoryview(bytearray(min(count, 1 << 20))) as buf:
                while count > 0:
                    k = os.preadv(fd, [buf[:min(count, len(buf))]], offset)
                    if k == 0:
                        raise OSError(f"file ended at byte {offset}")
                    sock.sendall(buf[:k])
                    offset += k
                    count -= k
            return
        with open(fd, "rb", closefd=False) as f:
            while count > 0:
                k = sock.sendfile(f, offset, count)
                if k == 0:
                    raise OSError(f"file ended at byte {offset}")
                offset += k
                count -= k

    def _read_answer(self) -> Answer:
        sock = self._live()
        buf = bytearray()
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise OSError(f"{self.route.origin}: answer head too large")
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError(f"{self.route.origin} closed the connection before answering")
            buf += data
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise OSError(f"{self.route.origin}: not an HTTP/1.x answer")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = bytes(buf[end + 4:])
        length = headers.get("content-length", "")
        want = min(int(length), MAX_BODY) if length.isdigit() else MAX_BODY
        while len(body) < want:  # the message of an error; a 202 has none
            data = sock.recv(want - len(body))
            if not data:
                break
            body += data
        return Answer(int(parts[1]), headers, body[:want])

    def _live(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise OSError(f"{self.route.origin}: connection closed")
        return sock


def hash_file(path, size: int) -> tuple[str, int]:
    """Worker thread: (``sha256:…`` of the first ``size`` bytes of ``path``, bytes it had)."""
    hasher = hashlib.sha256()
    got = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_PIECE)
        with memoryview(buf) as view:
            while got < size:
                k = f.readinto(view[:min(HASH_PIECE, size - got)])
                if not k:
                    break
                hasher.update(view[:k])
                got += k
    return "sha256:" + hasher.hexdigest(), got


class ChunkReader:
    """A source's chunks re-cut to exact lengths, so each PATCH sends what its headers say."""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self._it = source.__aiter__()
        self._left = b""

    async def take(self, n: int) -> AsyncIterator[bytes]:
        while n > 0:
            if not self._left:
                try:
                    self._left = await self._it.__anext__()
                except StopAsyncIteration:
                    return
                if not self._left:
                    continue
            if len(self._left) <= n:  # the usual case: the whole chunk, not a copy of it
                data, self._left = self._left, b""
            else:
                data, self._left = self._left[:n], self._left[n:]
            n -= len(data)
            yield data


async def feed(patch: Patch, chunks: AsyncIterator[bytes], hasher, progress: Callable[[int], None] | None) -> None:
    """Send ``chunks`` through ``patch``: received here while a worker thread hashes and sends the ones before."""
    send, recv = trio.open_memory_channel(FEED_DEPTH)

    async def produce() -> None:
        async with send:
            async for data in chunks:
                await send.send(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with recv:
            async for data in recv:
                await patch.send(data, hasher)
                if progress is not None:
                    progress(len(data))


async def file_pieces(fd: int, start: int, n: int) -> AsyncIterator[bytes]:
    """``fd``'s bytes ``[start, start + n)``, read in worker threads."""
    end = start + n
    while start < end:
        data = await trio.to_thread.run_sync(os.pread, fd, min(FILE_READ, end - start), start)
        if not data:
            return
        start += len(data)
        yield data
