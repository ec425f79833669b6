"""Errors of the NBD client.

Three kinds, because a caller reacts to each differently:

- ``OptionError`` and subclasses: the server refused an option while
  connecting (unknown export, TLS required, ...). Nothing was opened.
- ``RequestError``: one command failed with an errno and a message; the
  connection is still in sync and usable for the next command.
- ``ProtocolError`` and ``ConnectionClosed``: the server broke the
  protocol, went away or stopped answering; the byte stream can no longer
  be trusted, so the client is unusable and every later call raises.
"""

from __future__ import annotations

import errno as _errno

from diskferry.errors import DiskferryError


class NbdError(DiskferryError):
    """Base of every error raised by the NBD client."""


# --- handshake


class OptionError(NbdError):
    """Raised when the server answers an option with an error reply.

    ``reply`` is the NBD_REP_ERR_* code, ``option`` the NBD_OPT_* sent and
    ``message`` the server's own text (may be empty).
    """

    reply = 0

    def __init__(self, option: int, message: str = "", reply: int | None = None):
        if reply is not None:
            self.reply = reply
        self.option = option
        self.message = message
        text = f"server refused option {option}: {type(self).__name__}"
        if self.reply and type(self) is OptionError:
            text = f"server refused option {option}: error {self.reply:#x}"
        if message:
            text += f": {message}"
        super().__init__(text)


class OptionUnsupported(OptionError):
    """Raised when the server does not know the option (NBD_REP_ERR_UNSUP)."""

    reply = 0x80000001


class OptionPolicy(OptionError):
    """Raised when the server forbids the option (NBD_REP_ERR_POLICY)."""

    reply = 0x80000002


class OptionInvalid(OptionError):
    """Raised when the server found the option malformed (NBD_REP_ERR_INVALID)."""

    reply = 0x80000003


class OptionPlatform(OptionError):
    """Raised when the server's platform lacks the option (NBD_REP_ERR_PLATFORM)."""

    reply = 0x80000004


class TlsRequired(OptionError):
    """Raised when the server accepts the option only over TLS
    (NBD_REP_ERR_TLS_REQD); this client does not speak TLS."""

    reply = 0x80000005


class ExportUnknown(OptionError):
    """Raised when the export name is not known (NBD_REP_ERR_UNKNOWN)."""

    reply = 0x80000006


class ServerShutdown(OptionError):
    """Raised when the server is shutting down (NBD_REP_ERR_SHUTDOWN)."""

    reply = 0x80000007


class BlockSizeRequired(OptionError):
    """Raised when the server insists on block size negotiation
    (NBD_REP_ERR_BLOCK_SIZE_REQD)."""

    reply = 0x80000008


class TooBig(OptionError):
    """Raised when a request or reply would be too large (NBD_REP_ERR_TOO_BIG)."""

    reply = 0x80000009


class ExtendedHeadersRequired(OptionError):
    """Raised when the server wants extended headers first
    (NBD_REP_ERR_EXT_HEADER_REQD)."""

    reply = 0x8000000A


_OPTION_ERRORS: dict[int, type[OptionError]] = {
    cls.reply: cls
    for cls in (
        OptionUnsupported,
        OptionPolicy,
        OptionInvalid,
        OptionPlatform,
        TlsRequired,
        ExportUnknown,
        ServerShutdown,
        BlockSizeRequired,
        TooBig,
        ExtendedHeadersRequired,
    )
}


def option_error(option: int, reply: int, message: str) -> OptionError:
    """The precise exception for an error reply; unknown codes get the base."""
    cls = _OPTION_ERRORS.get(reply)
    if cls is None:
        return OptionError(option, message, reply=reply)
    return cls(option, message)


class DirtyBitmapError(NbdError):
    """Raised when the dirty bitmap asked for cannot be selected: not offered,
    none found, or several found when no name was given."""


class ContextNotNegotiated(NbdError):
    """Raised when a call needs a metadata context the connection lacks."""


# --- transmission


# NBD error values are defined by the protocol, not by the host: map them to
# this host's errno. Values outside the list must be treated as EINVAL.
NBD_ERRNO = {
    1: _errno.EPERM,
    5: _errno.EIO,
    12: _errno.ENOMEM,
    22: _errno.EINVAL,
    28: _errno.ENOSPC,
    75: _errno.EOVERFLOW,
    95: _errno.ENOTSUP,
    108: _errno.ESHUTDOWN,
}


class RequestError(NbdError):
    """Raised when a command failed; the connection remains usable.

    ``errno`` is the host errno for the NBD error value, ``message`` the
    server's text, ``offset`` where the failure happened if it said so.
    """

    def __init__(self, errno: int, message: str = "", offset: int | None = None):
        self.errno = errno
        self.message = message
        self.offset = offset
        name = _errno.errorcode.get(errno, str(errno))
        text = f"request failed: {name}"
        if message:
            text += f": {message}"
        if offset is not None:
            text += f" (at offset {offset})"
        super().__init__(text)

    @classmethod
    def from_wire(
        cls, value: int, message: str = "", offset: int | None = None
    ) -> RequestError:
        return cls(NBD_ERRNO.get(value, _errno.EINVAL), message, offset)


class ProtocolError(NbdError):
    """Raised when the server broke the protocol: the connection is unusable."""


class ConnectionClosed(NbdError):
    """Raised when the connection ended or failed under a command."""


class ConnectionTimeout(ConnectionClosed):
    """Raised when the server did not answer within the I/O timeout; the
    stream may be mid-reply, so the connection is given up."""
