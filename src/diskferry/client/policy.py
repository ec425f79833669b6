"""Immutable policies bounding how long the client waits and retries.

A ``Timeout`` or ``Retry`` is a value: configure it once, share it
between threads; ``Retry.increment()`` returns a new object instead of
counting in place, so one transfer's failures never leak into another.
Both are named tuples (like ``urllib.parse.SplitResult``): immutable,
and cheap to define, which keeps the command's start-up short.
"""

from __future__ import annotations

import time
from collections import namedtuple

from diskferry.client.errors import RetryExhausted


class Timeout(namedtuple("Timeout", "connect read", defaults=(10.0, 120.0))):
    """Seconds to wait for a connection and for each read or write.

    ``connect`` bounds the TCP connect and TLS handshake (or the UNIX
    socket connect); ``read`` bounds each socket operation afterwards,
    including the wait for a response while the server writes a request
    to storage. ``None`` waits forever.
    """

    __slots__ = ()
    connect: float | None
    read: float | None


class Retry(namedtuple("Retry", "total backoff_factor backoff_max history",
                       defaults=(3, 0.2, 10.0, ()))):
    """How often a request that lost its connection is sent again.

    ``total`` is the number of retries of one request (0 disables them).
    Between attempts the client sleeps ``backoff_factor * 2**(n - 1)``
    seconds (no sleep before the first retry), at most ``backoff_max``.
    Only transient failures are retried (``ConnectionFailed``); an HTTP
    error answer never is. ``history`` holds the failures seen so far,
    newest last.
    """

    __slots__ = ()

    total: int
    backoff_factor: float
    backoff_max: float
    history: tuple[BaseException, ...]

    def increment(self, error: BaseException) -> Retry:
        """Return the policy after one more failure, or raise when spent."""
        history = self.history + (error,)
        if len(history) > self.total:
            raise RetryExhausted(
                f"gave up after {len(history)} attempts: {error}", error
            ) from error
        return self._replace(history=history)

    def backoff(self) -> float:
        """Seconds to wait before the next attempt."""
        retries = len(self.history)
        if retries <= 1:
            return 0.0
        return min(self.backoff_max, self.backoff_factor * 2.0 ** (retries - 1))

    def sleep(self) -> None:
        delay = self.backoff()
        if delay:
            time.sleep(delay)
