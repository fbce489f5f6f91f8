"""Make httpx fast enough to stream layers.

httpcore reads an HTTP/1.1 response 64 KiB at a time, and each read is a trip through h11 and the
trio socket layer. Measured here on a loopback registry (400 MiB blob, one stream): 354 MB/s at
64 KiB, 866 MB/s at 1 MiB, against curl's 1,400 MB/s. The knob is a class attribute of httpcore's
HTTP/1.1 connection; if a future httpcore drops it, we are slower, not broken.
"""

from __future__ import annotations

READ_BYTES = 1 << 20


def apply() -> None:
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:  # pragma: no cover - a different httpcore layout
        return
    for cls in (AsyncHTTP11Connection, HTTP11Connection):
        if getattr(cls, "READ_NUM_BYTES", 0) < READ_BYTES:
            cls.READ_NUM_BYTES = READ_BYTES
