"""Errors of the daemon, each carrying the HTTP status it maps to.

Two kinds, kept apart as the connection loop treats them differently:

- ``RequestError`` and subclasses: this request failed; the server answers
  with the status and a short text message, and the connection goes on
  (unless ``close_connection`` says the stream is no longer in sync).
- ``ConnectionGone``: the peer broke the stream or went away; nothing can
  be answered, the connection is closed.

Backends know no HTTP: they raise ``BackendError`` and its subclasses,
which ``request_error`` turns into the answer, when a request's handling
ends (``handlers/app.py``). HTTP statuses are assigned here and only here.
"""

import errno
from http import HTTPStatus


class DiskferryError(Exception):
    """Base of every error raised by diskferry."""


class ConnectionGone(DiskferryError):
    """Raised when the peer closed or reset the connection mid-request."""


class RequestError(DiskferryError):
    """Raised when a request cannot be served; answered with ``status``."""

    status = 500
    #: True when the request body was not consumed, so the byte stream is
    #: out of sync and the connection must close after the answer.
    close_connection = False
    #: Most body bytes read and dropped before answering, so that a client
    #: still sending reads the answer instead of a broken pipe (None: the
    #: server's small default for refused requests).
    discard_limit: int | None = None

    def __init__(self, message: str, *,
                 close_connection: bool | None = None) -> None:
        super().__init__(message)
        if close_connection is not None:
            self.close_connection = close_connection

    @property
    def message(self) -> str:
        return str(self.args[0])

    def headers(self) -> dict[str, str]:
        """Headers the answer carries besides the usual ones."""
        return {}


class BadRequest(RequestError):
    """Raised for a malformed request: bad header, JSON, query or body."""

    status = 400


class Forbidden(RequestError):
    """Raised for an unknown, expired or canceled ticket or a denied op."""

    status = 403
    close_connection = True


class NotFound(RequestError):
    """Raised when the resource does not exist."""

    status = 404


class MethodNotAllowed(RequestError):
    """Raised when the resource does not support the method.

    ``allow`` lists the methods it does support, sent as ``Allow``.
    """

    status = 405

    def __init__(self, message: str, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ",".join(self.allow)}


class RequestTimeout(RequestError):
    """Raised when a request head did not arrive within its deadline."""

    status = 408
    close_connection = True


class Conflict(RequestError):
    """Raised when a ticket cannot be removed because it is still in use."""

    status = 409


class Gone(RequestError):
    """Raised when what a ticket served is gone for good (the domain of
    a backup stopped)."""

    status = 410


class PayloadTooLarge(RequestError):
    """Raised when a JSON body is larger than allowed."""

    status = 413
    close_connection = True


class URITooLong(RequestError):
    """Raised when the request line is longer than allowed."""

    status = 414
    close_connection = True


class RangeNotSatisfiable(RequestError):
    """Raised when a range lies outside the image.

    ``size`` is the image size, reported as ``Content-Range: bytes */SIZE``.
    """

    status = 416

    def __init__(self, message: str, size: int | None = None, *,
                 close_connection: bool | None = None) -> None:
        super().__init__(message, close_connection=close_connection)
        self.size = size

    def headers(self) -> dict[str, str]:
        if self.size is None:
            return {}
        return {"Content-Range": f"bytes */{self.size}"}


class HeadersTooLarge(RequestError):
    """Raised when a header line is too long or there are too many."""

    status = 431
    close_connection = True


class ServerError(RequestError):
    """Raised when the server failed; for PUT, resend since the last flush."""

    status = 500
    close_connection = True


class MethodNotImplemented(RequestError):
    """Raised for a request method that no resource of the server knows."""

    status = 501


class ServiceUnavailable(RequestError):
    """Raised when the server has no room for another connection now.

    ``retry_after`` is the seconds a client should wait, sent as
    ``Retry-After``.
    """

    status = 503
    close_connection = True

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}




# Ticket errors, raised by the ticket store.

class TicketNotFound(NotFound):
    """Raised when the control service is asked for an unknown ticket."""


class TicketForbidden(Forbidden):
    """Raised when an images request names an unusable ticket."""


class TicketInUse(Conflict):
    """Raised when deleting a ticket timed out waiting for its operations."""


class InsufficientStorage(RequestError):
    """Raised when the image's storage is full (ENOSPC, EDQUOT)."""

    status = 507


#: Body bytes a failed write drains before its answer: a whole request of
#: the usual clients (ovirt-imageio's client sends at most 8 MiB pieces,
#: diskferry's at most 64 MiB), and more than a pipe or a socket buffer.
STORAGE_ERROR_DISCARD = 256 * 1024**2


def storage_error(error: OSError, what: str) -> RequestError:
    """The answer to writing an image that failed with ``error``: 507 for
    full storage, else 500, naming the error; the rest of the body is
    drained first so that every transport reads it."""
    reason = error.strerror or str(error)
    answer: RequestError
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        answer = InsufficientStorage(f"{what} failed: {reason}")
    else:
        answer = ServerError(f"{what} failed: {reason}")
    answer.discard_limit = STORAGE_ERROR_DISCARD
    return answer


# Backend errors: raised below the handlers, answered by ``request_error``.

class BackendError(DiskferryError):
    """Raised by a backend when the storage under it failed."""


class NotAvailable(BackendError):
    """Raised by a backend asked for what its storage does not keep, such
    as dirty extents of a plain file."""


class FeatureNotOffered(BackendError):
    """Raised when the storage lacks the feature a request needs (the
    server behind a proxied image does not offer zero): the request is
    wrong for this image, a 400."""


class UpstreamAnswered(BackendError):
    """Raised when the server behind a proxied image refused a request:
    the client gets its ``status`` and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UpstreamFailed(BackendError):
    """Raised when the server behind a proxied image could not be used
    (gone, or an answer that makes no sense): a 500, whose message says
    nothing of the server; its details are logged where they are known."""


class ExportFailed(BackendError):
    """Raised when the export the daemon runs for a ticket died or could
    not start: a 500 naming the cause (the export's exit), which is the
    daemon's own business, not the storage's."""


class StorageLost(BackendError):
    """Raised when the storage behind an image went away in the middle of
    a request (the server of an NBD export died): a 500 that says so,
    after the rest of the body is drained as for a failed write; which
    storage and what failed go to the access line, as its cause."""


#: The message of ``StorageLost``: the client may send the request again
#: once the storage is back; where it was is for the log only.
STORAGE_LOST = "The image's storage went away during the request"


#: Status passed back when the upstream's is not a client or server
#: error this daemon could send.
BAD_GATEWAY = 502

#: The message of a backend error whose details are for the log only (as
#: the server's answer to any other failure).
INTERNAL_ERROR = "Internal server error"


class UpstreamError(RequestError):
    """The answer to ``UpstreamAnswered``: the upstream's status, if this
    daemon may send it, and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status if _sendable(status) else BAD_GATEWAY


#: The statuses an answer may carry: what ``http.HTTPStatus`` knows.
_STATUSES = frozenset(HTTPStatus)


def _sendable(status: int) -> bool:
    return 400 <= status < 600 and status in _STATUSES


def request_error(error: BackendError) -> RequestError:
    """The answer to a request that failed with ``error``."""
    message = str(error)
    if isinstance(error, FeatureNotOffered):
        return BadRequest(message)
    if isinstance(error, UpstreamAnswered):
        return UpstreamError(error.status, message)
    if isinstance(error, UpstreamFailed | ExportFailed):
        return ServerError(message)
    if isinstance(error, StorageLost):
        answer = ServerError(STORAGE_LOST)
        answer.discard_limit = STORAGE_ERROR_DISCARD
        return answer
    return ServerError(INTERNAL_ERROR)
