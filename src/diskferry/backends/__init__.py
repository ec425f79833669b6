"""Storage backends: where the bytes of an image live.

A backend is opened per connection from a ticket's URL (``open_backend``)
and offers the small interface of ``base.Backend``. Nothing below here
knows HTTP.
"""

import urllib.parse

from diskferry.backends.file import FileBackend
from diskferry.errors import BackendError


def open_backend(ticket, *, direct=False):
    """Open the backend a ticket names, for one connection."""
    url = urllib.parse.urlsplit(ticket.spec.url)
    if url.scheme == "file":
        return FileBackend(urllib.parse.unquote(url.path),
                           writable="write" in ticket.spec.ops,
                           direct=direct, sparse=ticket.spec.sparse)
    raise BackendError(f"Unsupported backend URL scheme {url.scheme!r}")
