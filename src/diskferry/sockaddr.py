"""UNIX socket addresses in Linux's abstract namespace, spelled two ways.

The kernel names an abstract socket by a leading NUL (``"\\0name"``); that
is how a server advertises it in ``OPTIONS`` and how ``bind`` and
``connect`` take it. People and tools (``ss``, ``socat``, systemd's
``NOTIFY_SOCKET``, a configuration file) write ``"@name"`` instead, which
also prints. Anything else is a path. The daemon and the client both
convert here, so the two spellings mean the same everywhere.
"""

#: How a person writes the leading NUL of an abstract address.
DISPLAY_PREFIX = "@"

#: How the kernel marks an abstract address.
KERNEL_PREFIX = "\0"


def is_abstract(address: str) -> bool:
    """True for an abstract address in either spelling."""
    return address.startswith((KERNEL_PREFIX, DISPLAY_PREFIX))


def kernel_address(address: str | bytes) -> str:
    """``address`` as ``bind`` and ``connect`` take it: "@name" -> "\\0name".

    Bytes (an address as ``getsockname`` returns it) must be UTF-8.
    """
    if isinstance(address, bytes):
        address = address.decode()
    if address.startswith(DISPLAY_PREFIX):
        return KERNEL_PREFIX + address[1:]
    return address


def display_address(address: str | bytes) -> str:
    """``address`` printable: "\\0name" -> "@name"; a path as it is.

    Bytes that are not UTF-8 are shown with replacement characters: this
    is for messages, never for connecting.
    """
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    if address.startswith(KERNEL_PREFIX):
        return DISPLAY_PREFIX + address[1:]
    return address
