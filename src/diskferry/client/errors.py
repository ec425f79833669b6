"""Errors raised by the client, in one place.

Two families, because the copy engine treats them differently:

- ``ConnectionFailed``: the transport broke (reset, timeout, a body cut
  short). Transient: the request may be sent again on a new connection,
  as the ``Retry`` policy allows.
- Everything else (``HTTPError``, ``TransferError``, ...): retrying
  cannot help; the transfer stops and the error says why and where.
"""

from __future__ import annotations

from diskferry.errors import DiskferryError


class ClientError(DiskferryError):
    """Base of every error raised by ``diskferry.client``."""


class ConnectionFailed(ClientError):
    """Raised when the connection broke before a request completed."""


class HTTPError(ClientError):
    """Raised when the server answered a request with an error status.

    ``status`` is the HTTP status, ``message`` the server's explanation.
    """

    def __init__(self, method: str, target: str, status: int, reason: str,
                 message: str) -> None:
        self.method = method
        self.target = target
        self.status = status
        self.reason = reason
        self.message = message
        text = f"{method} {target}: {status} {reason}"
        if message:
            text += f": {message}"
        super().__init__(text)


class ProtocolError(ClientError):
    """Raised when the server's answer does not follow the protocol."""


class UnsupportedOperation(ClientError):
    """Raised when the server or ticket does not offer what was asked."""


class UnixSocketUnavailable(ClientError):
    """Raised when ``unix="always"`` was asked but the socket is unusable."""


class TunnelNotSupported(ClientError, NotImplementedError):
    """Raised by ``UnixHTTPConnection.set_tunnel``: no proxy on a socket."""


class RetryExhausted(ClientError):
    """Raised when a request failed more times than the ``Retry`` allows.

    ``last_error`` is the failure that used up the budget.
    """

    def __init__(self, message: str,
                 last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


class TransferError(ClientError):
    """Raised when copying an image failed; ``offset`` is where the copy
    stopped, None when the failure is not about a place in the image;
    the message names it once.

    The cause (``__cause__``) is the underlying error.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        if offset is not None and f"offset {offset}" not in message:
            message = f"{message} (at offset {offset})"
        super().__init__(message)
        self.offset = offset


class OutputClosed(ClientError):
    """Raised when a download to a stream (standard output) lost its
    reader (``| head``): not a network failure, so never retried."""


class UnsupportedFormat(ClientError):
    """Raised before an upload sends anything when its source is not raw
    (an upload would write the container into the disk) or a format was
    asked for that the client cannot convert.

    ``path`` is the source, ``format`` the format found or asked for,
    ``probe`` what probing found (an ``imageformat.Probe``, or None when
    nothing was probed).
    """

    def __init__(self, message: str, *, path: str, format: str,
                 probe: object = None) -> None:
        super().__init__(message)
        self.path = path
        self.format = format
        self.probe = probe
