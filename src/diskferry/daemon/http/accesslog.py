"""The access log: one line per request, ticket ids shortened.

    [remote/3] 127.0.0.1:40112 GET /images/6f1c... 206 bytes=1048576 0.004s 250.0MiB/s
    [local/7] local OPTIONS /images/d... 403 0.000s: No such ticket 'd...'

A line says what was asked (method, path), what was answered (status,
``-`` when the client left before any answer), how much image data the
request moved (``bytes``, as the handler counted it), how long it took
and at what rate. A refused or failed request has its cause instead of
the bytes and the rate (for a transfer cut short, ``size``: what was
asked): the error is logged there, once, rather than on a line of its
own.

A ticket id is a bearer secret: whoever reads it in a log may use the
image. Paths under ``/images/`` and ``/tickets/`` name one, and error
messages repeat it, so every occurrence on a line is shortened to a
prefix too short to guess from (``secret_prefix``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: Paths whose second segment is a ticket id.
_TICKET_PATHS = ("/images/", "/tickets/")

#: Characters of a ticket id a log may show, at most.
PREFIX = 4

#: Shortest id replaced also where it is not quoted: a shorter one
#: ("a", "demo") may be part of any word of a message.
_BARE_MIN = 8

#: Ids that name no ticket: ``OPTIONS /images/*``.
_NOT_SECRETS = ("", "*")


def ticket_id(path: str) -> str | None:
    """The ticket id a request path names, if any."""
    for prefix in _TICKET_PATHS:
        if path.startswith(prefix):
            value = path[len(prefix):].split("/", 1)[0]
            return None if value in _NOT_SECRETS else value
    return None


def secret_prefix(secret: str) -> str:
    """``secret`` shortened to at most a quarter of it, 4 characters at
    most, and "...": never enough to use it."""
    return secret[:min(PREFIX, len(secret) // 4)] + "..."


def default_transfer_id(secret: str) -> str:
    """The transfer id of a ticket that has none: half its id, as
    ovirt-imageio names it; too much of a secret for a log."""
    return f"(ticket/{secret[:18]})"


def redact_path(path: str) -> str:
    """``path`` with the ticket id it names shortened."""
    for prefix in _TICKET_PATHS:
        if path.startswith(prefix):
            secret, slash, rest = path[len(prefix):].partition("/")
            if secret in _NOT_SECRETS:
                return path
            return prefix + secret_prefix(secret) + slash + rest
    return path


_PATH_IN_TEXT = re.compile(r"(/images/|/tickets/)([^/\s'\"?\\]+)")


def redact_paths(text: str) -> str:
    """``text`` with the ids of ticket paths in it shortened (messages
    that quote a malformed request line or target)."""
    return _PATH_IN_TEXT.sub(
        lambda m: m.group(1) + (m.group(2) if m.group(2) in _NOT_SECRETS
                                else secret_prefix(m.group(2))), text)


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` shortened where it is quoted (``repr``,
    as error messages name ids), in a ticket's default transfer id, and,
    when it is long enough not to be part of other words, wherever it
    occurs."""
    if not secret:
        return text
    short = secret_prefix(secret)
    text = text.replace(repr(secret), repr(short))
    text = text.replace(default_transfer_id(secret),
                        f"(ticket/{short})")
    if len(secret) >= _BARE_MIN:
        text = text.replace(secret, short)
    return text


def line(*, conn_id: str, client: str, method: str, path: str,
         status: int | None, fields: Mapping[str, object], elapsed: float,
         cause: str | None = None) -> str:
    """The access line of one request (see the module's docstring)."""
    size = fields.get("size")
    secret = ticket_id(path)
    parts = [f"[{conn_id}]", client, method, redact_path(path),
             str(status) if status is not None else "-"]
    if "transfer_id" in fields:
        parts.append(f"transfer={fields['transfer_id']}")
    if "offset" in fields:
        parts.append(f"offset={fields['offset']}")
    if cause is None:
        moved = size if isinstance(size, int) else 0
        parts.append(f"bytes={moved}")
        parts.append(f"{elapsed:.3f}s")
        if moved and elapsed > 0:
            parts.append(f"{moved / elapsed / 1024**2:.1f}MiB/s")
    else:
        # Failed: how much of it moved is unknown; say what was asked.
        if isinstance(size, int):
            parts.append(f"size={size}")
        parts.append(f"{elapsed:.3f}s")
    text = redact(" ".join(parts), secret)
    if cause is not None:
        text += f": {redact_paths(redact(cause, secret))}"
    return text
