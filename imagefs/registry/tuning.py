"""Make httpx fast enough to stream layers, and size the direct body path (:mod:`.direct`).

httpcore reads an HTTP/1.1 response 64 KiB at a time, and each read is a trip through h11 and the
trio socket layer. Measured here on a loopback registry (400 MiB blob, one stream): 354 MB/s at
64 KiB, 866 MB/s at 1 MiB, against curl's 1,400 MB/s. The knob is a class attribute of httpcore's
HTTP/1.1 connection; if a future httpcore drops it, we are slower, not broken.
"""

from __future__ import annotations

READ_BYTES = 1 << 20
#: Ranges at least this long go through the direct path once their source is known; smaller ones
#: (a random read's span) stay on httpx's pooled connections.
DIRECT_MIN = 1 << 20
#: One worker-thread read of a direct body, and one write into the ingest.
DIRECT_CHUNK = 4 << 20
#: A body's first chunk; each next one twice the last, up to DIRECT_CHUNK. A reader waits for the
#: whole chunk its bytes are in, so a stream's first bytes come sooner in small ones.
FIRST_CHUNK = 256 << 10
#: Idle direct connections kept per origin.
DIRECT_IDLE = 4
#: Direct bodies open at once (each holds up to two chunks: 64 MiB in all); more streams use httpx.
DIRECT_BODIES = 8


def apply() -> None:
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:  # pragma: no cover - a different httpcore layout
        return
    for cls in (AsyncHTTP11Connection, HTTP11Connection):
        if getattr(cls, "READ_NUM_BYTES", 0) < READ_BYTES:
            cls.READ_NUM_BYTES = READ_BYTES
