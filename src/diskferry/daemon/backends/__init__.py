"""Storage backends: where the bytes of an image live.

A ticket's URL scheme selects its backend in ``BACKENDS``; the ticket
store checks URLs with it when a ticket is installed, and a connection
opens its backend with it on first use. Adding a backend is a new module
and one line here. Nothing below here knows HTTP.
"""

import urllib.parse
from typing import TYPE_CHECKING

from diskferry.daemon.backends import file, http, managed, nbd
from diskferry.daemon.backends.base import Backend, BackendKind
from diskferry.errors import BackendError

if TYPE_CHECKING:
    from diskferry.daemon.config import Config
    from diskferry.daemon.tickets import Ticket

#: URL scheme -> backend.
BACKENDS: dict[str, BackendKind] = {
    "file": file.KIND,
    "nbd": nbd.KIND,
    "nbd+unix": nbd.KIND,
    "https": http.KIND,
    "http": http.KIND,
}


def check_url(url: urllib.parse.SplitResult) -> None:
    """Raise ``ValueError`` naming the problem if no backend serves ``url``."""
    kind = BACKENDS.get(url.scheme)
    if kind is None:
        raise ValueError(f"unsupported scheme {url.scheme!r}; supported: "
                         f"{', '.join(BACKENDS)}")
    kind.check_url(url)


def open_backend(ticket: "Ticket", config: "Config") -> Backend:
    """Open the backend a ticket names, for one connection: the export
    the daemon runs for it, if it has one."""
    if ticket.export is not None:
        return managed.open_managed(ticket, config)
    url = urllib.parse.urlsplit(ticket.spec.url)
    kind = BACKENDS.get(url.scheme)
    if kind is None:  # a ticket is checked when installed: cannot happen
        raise BackendError(f"Unsupported backend URL scheme {url.scheme!r}")
    return kind.open(ticket, config)
