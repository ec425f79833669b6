"""Client for image servers speaking the ovirt-imageio images API.

Works with diskferry's daemon and with ovirt-imageio 2.x. Layers, lowest
first, each usable alone:

- ``UnixHTTPConnection`` (``uhttp``): ``http.client`` over a UNIX socket.
- ``open()`` -> ``Session`` (``session``): one image URL; OPTIONS,
  locality, the switch to the server's UNIX socket, and the images API
  as methods (read, write, zero, flush, extents, checksum).
- ``upload()`` / ``download()`` (``copy``): whole images, in parallel,
  sparse-aware, with retries and progress, between a transfer and a
  local ``Source`` or ``Destination`` (``local``). An upload refuses a
  source it cannot read as a disk (``imageformat``), and both refuse
  options that cannot work together (``OptionConflict``, ``rules``),
  before they send anything.

Policies (``Timeout``, ``Retry``) are immutable values; errors derive
from ``ClientError``.
"""

from diskferry.client.copy import TransferResult, download, upload
from diskferry.client.errors import (
    ClientError,
    ConnectionFailed,
    HTTPError,
    OutputClosed,
    ProtocolError,
    RetryExhausted,
    TransferError,
    TunnelNotSupported,
    UnixSocketUnavailable,
    UnsupportedFormat,
    UnsupportedOperation,
)
from diskferry.client.policy import Retry, Timeout
from diskferry.client.rules import OptionConflict
from diskferry.client.session import ConnectionOptions, Session, open
from diskferry.client.uhttp import UnixHTTPConnection
from diskferry.extent import Extent

__all__ = [
    "ClientError",
    "ConnectionFailed",
    "ConnectionOptions",
    "Extent",
    "HTTPError",
    "OptionConflict",
    "OutputClosed",
    "ProtocolError",
    "Retry",
    "RetryExhausted",
    "Session",
    "Timeout",
    "TransferError",
    "TransferResult",
    "TunnelNotSupported",
    "UnixHTTPConnection",
    "UnixSocketUnavailable",
    "UnsupportedFormat",
    "UnsupportedOperation",
    "download",
    "open",
    "upload",
]
