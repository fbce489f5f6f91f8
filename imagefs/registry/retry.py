"""When to try a registry request again, and how long to wait first.

Registries and the CDNs behind them fail in passing: 429 when a client asks too fast (often
with ``Retry-After`` saying when to come back), 500/502/503/504 from a backend that is
overloaded or restarting, connections reset or timed out in the middle of a body. A
:class:`Retrier` waits a jittered, exponentially growing time between attempts — the jitter keeps
many mounts that failed together from coming back together — and gives up after a bounded number
of consecutive failures or once its time budget is spent, so an operation ends in data or an
error, never a hang. It waits with ``trio.sleep``: the mount serves other requests meanwhile.

What is *not* retried: a refused connection, a failed DNS lookup or TLS handshake (another try
fails the same way, and a mount falls back to its remembered tag at once), and any request that
got its whole answer — Docker Hub counts every manifest GET against a pull limit.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass, replace
from datetime import timezone
from typing import Callable

import httpx
import trio

from ..errors import ImagefsError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one operation.

    ``attempts`` counts tries in a row that made no progress, the first included; a blob stream
    that delivered bytes since its last failure starts counting again, so a long download over
    a flaky link is not cut short while a dead one still ends. ``budget`` bounds the seconds from
    the first try (or the last progress) to the start of a retry. ``max_retry_after`` is the
    longest ``Retry-After`` honoured; a registry asking for more gets an error now, not a mount
    frozen for an hour.
    """

    attempts: int = 5
    base: float = 0.25
    cap: float = 8.0
    budget: float = 60.0
    max_retry_after: float = 30.0

    def delay(self, failures: int) -> float:
        """Equal jitter: half of the exponential step for sure, up to the other half at random."""
        step = min(self.cap, self.base * 2 ** max(failures - 1, 0))
        return step / 2 + random.uniform(0, step / 2)

    def with_attempts(self, attempts: int) -> "RetryPolicy":
        return replace(self, attempts=min(self.attempts, attempts))


#: Blobs and manifests: the mount waits for these, but a minute at most between progress.
FETCH = RetryPolicy()
#: Resolving a tag at mount: quick, so a dead registry falls back to the remembered tag fast.
RESOLVE = RetryPolicy(attempts=4, base=0.25, cap=2.0, budget=5.0, max_retry_after=5.0)
#: A host with another to fall back to (a mirror) gets one retry, then the next host is tried.
FALLBACK_ATTEMPTS = 2


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).

    None when absent or unreadable; a date in the past is 0.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def retryable_transport(exc: httpx.TransportError, *, connect_timeout: bool = True) -> bool:
    """Resets, cut bodies and timeouts are worth another try; refusals, DNS and TLS errors are not.

    ``connect_timeout=False`` for hosts with a fallback: a mirror that does not even accept a
    connection is skipped rather than waited for twice.
    """
    if isinstance(exc, httpx.ConnectTimeout):
        return connect_timeout
    if isinstance(exc, httpx.TimeoutException):
        return True
    if isinstance(exc, httpx.ConnectError):
        return False
    return isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.CloseError))


class Retrier:
    """The retry state of one operation (a resolve, a manifest, one blob stream on one host)."""

    def __init__(self, policy: RetryPolicy, what: str, on_retry: Callable[[], None] | None = None) -> None:
        self.policy = policy
        self.what = what
        self.on_retry = on_retry  # counts retries in the transport's statistics
        self.failures = 0
        self.tries = 1
        self.started = trio.current_time()
        self.refused_wait: float | None = None
        self.progressed = False

    def progress(self) -> None:
        """The operation moved forward: failures so far no longer count against it."""
        self.progressed = True
        if self.failures:
            self.failures = 0
            self.started = trio.current_time()

    async def wait(self, error: BaseException, retry_after: float | None = None) -> bool:
        """Sleep before the next try and return True, or return False if it is time to give up."""
        self.failures += 1
        policy = self.policy
        if self.failures >= policy.attempts:
            return False
        if retry_after is not None:
            if retry_after > policy.max_retry_after:
                log.debug("%s: registry asks to retry after %.0f s, more than the %.0f s we wait: %s",
                          self.what, retry_after, policy.max_retry_after, error)
                self.refused_wait = retry_after
                return False
            delay = retry_after
        elif self.progressed and self.failures == 1:
            # A stream that was moving and broke: resume soon (only a little jitter), not backoff.
            delay = random.uniform(0, policy.base / 4)
        else:
            delay = policy.delay(self.failures)
        self.progressed = False
        elapsed = trio.current_time() - self.started
        if elapsed + delay > policy.budget:
            return False
        log.debug("%s: %s; retry %d of %d in %.2f s", self.what, error, self.failures, policy.attempts - 1, delay)
        if self.on_retry is not None:
            self.on_retry()
        await trio.sleep(delay)
        self.tries += 1
        return True

    def gave_up(self, error: ImagefsError) -> ImagefsError:
        """``error``, saying how long we tried, as the same class (callers catch by class)."""
        if self.refused_wait is not None:
            note = f"the registry asks to retry after {self.refused_wait:.0f} s"
        elif self.tries > 1:
            note = f"gave up after {self.tries} attempts in {trio.current_time() - self.started:.1f} s"
        else:
            return error
        annotated = type(error)(f"{error} ({note})")
        annotated.__cause__ = error.__cause__
        return annotated
