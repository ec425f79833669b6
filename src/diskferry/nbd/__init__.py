"""A pure-Python NBD client: fixed newstyle, structured replies, optional
extended headers, block status, pipelining.

Layers, each importable and testable alone::

    Client (client.py)          sockets, timeouts, pipelining, the data API
       |        \\
       |         extents.py      block status descriptors -> Extent, merged
       |
    handshake.py                sans-I/O: option requests, the handshake
                                state machine
    transmission.py             sans-I/O: request packing, reply decoding
                                with strict checks
    wire.py                     magics, commands, flags, limits, header layouts
    url.py                      nbd:unix:..., nbd:HOST:PORT, nbd://, nbd+unix://
    errors.py                   OptionError*, RequestError, ProtocolError, ...

Why sans-I/O: every rule (bad magic, a chunk outside its request, an
error after data, DONE without full coverage) is a pure function of bytes
and can be tested by tables without a server; the socket code is left
with reading what the protocol asks for into where it says.

What is pipelined: ``readinto``, ``write``, ``zero`` and ``trim`` cut a
large range into requests and keep several in flight on one socket,
matching replies by cookie in any order; ``submit_read``/``submit_write``
and ``wait`` do the same for a caller's own scheduling. A client is for
one thread at a time.
"""

from .client import ANY_BITMAP, Client, Handle, open_client
from .errors import (
    BlockSizeRequired,
    ConnectionClosed,
    ConnectionTimeout,
    ContextNotNegotiated,
    DirtyBitmapError,
    ExportUnknown,
    ExtendedHeadersRequired,
    NbdError,
    OptionError,
    OptionUnsupported,
    ProtocolError,
    RequestError,
    ServerShutdown,
    TlsRequired,
    TooBig,
)
from .url import NbdURL, parse_url

__all__ = [
    "ANY_BITMAP",
    "BlockSizeRequired",
    "Client",
    "ConnectionClosed",
    "ConnectionTimeout",
    "ContextNotNegotiated",
    "DirtyBitmapError",
    "ExportUnknown",
    "ExtendedHeadersRequired",
    "Handle",
    "NbdError",
    "NbdURL",
    "OptionError",
    "OptionUnsupported",
    "ProtocolError",
    "RequestError",
    "ServerShutdown",
    "TlsRequired",
    "TooBig",
    "open_client",
    "parse_url",
]
