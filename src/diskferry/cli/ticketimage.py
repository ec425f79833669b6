"""What ``diskferry ticket add IMAGE`` installs: the ticket's url and size.

IMAGE is one of three kinds, told by its start:

- an NBD URL (``nbd:``, ``nbd+unix:``): kept as written; the size is the
  export's, asked of the NBD server;
- a transfer URL (``https://`` or ``http://``): the proxy form, kept as
  written; the size is the upstream image's, asked as a download would;
- anything else is a file or block device: its absolute path, quoted
  into a ``file://`` URL (the daemon unquotes it, so a ``?``, ``#``,
  ``%`` or space in a name stays part of the name), and its size.

``--size`` overrides the size of any kind; a size that cannot be learnt
says how it was asked and that ``--size`` gives it.
"""

from __future__ import annotations

import errno
import os
import urllib.parse
from dataclasses import dataclass

from diskferry.cli import hints
from diskferry.cli.control import ControlError

NBD_PREFIXES = ("nbd:", "nbd+unix:")
TRANSFER_PREFIXES = ("https://", "http://")

#: Errors of a file IMAGE that no --size mends: it is not there.
MISSING = (errno.ENOENT, errno.ENOTDIR)


@dataclass(frozen=True)
class UpstreamAccess:
    """How to verify an ``https://`` IMAGE's server when asking its size."""

    cafile: str | None = None


def ticket_url(image: str) -> str:
    """The ticket ``url`` that names ``image``."""
    if image.startswith(NBD_PREFIXES + TRANSFER_PREFIXES):
        return image
    path = os.path.abspath(image)
    try:
        os.stat(path)
    except OSError as e:
        # The daemon would take the ticket and fail every request on it;
        # a file this command may not see (EACCES) may be the daemon's.
        if e.errno in MISSING:
            raise ControlError(f"{path}: {e.strerror}; IMAGE is an "
                               f"existing file or block device, an NBD "
                               f"URL or a transfer URL") from e
    return file_url(path)


def file_url(path: str) -> str:
    """``file://`` and ``path`` percent-encoded, which the file backend
    decodes back to ``path``."""
    return "file://" + urllib.parse.quote(path)


def image_size(image: str, access: UpstreamAccess) -> int:
    """The size of ``image`` in bytes, asked of whatever holds it."""
    if image.startswith(NBD_PREFIXES):
        return _export_size(image)
    if image.startswith(TRANSFER_PREFIXES):
        return _upstream_size(image, access)
    return _file_size(os.path.abspath(image))


def _file_size(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.seek(0, os.SEEK_END)
    except OSError as e:
        # Only a file that exists may be readable to the daemon and not
        # to this command: --size helps then, and only then.
        fix = "" if e.errno in MISSING else "; give --size"
        raise ControlError(f"cannot read the size of {path}: "
                           f"{e.strerror}{fix}") from e


def _export_size(url: str) -> int:
    from diskferry import nbd

    try:
        client = nbd.open_client(url)
    except ValueError as e:
        raise ControlError(f"{url} is not an NBD URL: {e}") from e
    except nbd.NbdError as e:
        raise ControlError(f"cannot read the size of {url}: {e}; "
                           f"give --size") from e
    try:
        size: int = client.size
        return size
    finally:
        client.close()


def _upstream_size(url: str, access: UpstreamAccess) -> int:
    from diskferry import client

    try:
        with client.open(url, "r", cafile=access.cafile) as upstream:
            size: int = upstream.size()
            return size
    except (client.ClientError, OSError, ValueError) as e:
        fix = ("give --cafile (the CA that signed its certificate) or "
               "--size" if hints.certificate_unverified(e) else
               "give --size")
        raise ControlError(f"cannot read the size of {url}: {e}; "
                           f"{fix}") from e
