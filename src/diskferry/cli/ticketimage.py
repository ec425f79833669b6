"""What ``diskferry ticket add IMAGE`` installs: the ticket's url and size.

IMAGE is one of three kinds, told by its start:

- an NBD URL (``nbd:``, ``nbd+unix:``): kept as written; the size is the
  export's, asked of the NBD server;
- a transfer URL (``https://`` or ``http://``): the proxy form, kept as
  written; the size is the upstream image's, asked as a download would;
- anything else is a file or block device: its absolute path, quoted
  into a ``file://`` URL (the daemon unquotes it, so a ``?``, ``#``,
  ``%`` or space in a name stays part of the name), and its size.

A file's format is probed as an upload probes its source (``qemu-img
info`` and magic bytes, see ``client.imageformat``): a raw file is served
as it is; an image in a format qemu reads (qcow2, vmdk, ...) gets a
ticket ``format``, so that the daemon serves the guest's disk through an
export of its own, and its size is the guest's; anything else is refused
unless ``--format raw`` asks for the file's bytes as they are.

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

#: The ticket format of an image served as its bytes.
RAW = "raw"

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


def image_format(image: str, requested: str | None) -> str:
    """The ticket ``format`` of ``image``: ``requested``, else a file's
    probed format; raw for a URL, which serves a disk already."""
    if image.startswith(NBD_PREFIXES + TRANSFER_PREFIXES):
        if requested not in (None, RAW):
            raise ControlError(f"--format {requested} is for image files: "
                               f"{image} serves a disk already")
        return RAW
    path = os.path.abspath(image)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        # Maybe the daemon's to read: ticket_url and image_size tell
        # what is wrong, or --size mends it.
        return requested or RAW
    from diskferry.client import imageformat
    from diskferry.client.errors import UnsupportedFormat

    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return imageformat.source_format(path, fd, size, requested,
                                         force="--format raw")
    except UnsupportedFormat as e:
        raise ControlError(str(e)) from e
    finally:
        os.close(fd)


def image_size(image: str, access: UpstreamAccess, fmt: str = RAW) -> int:
    """The size of ``image`` in bytes, asked of whatever holds it: for a
    format other than raw, the guest disk's."""
    if image.startswith(NBD_PREFIXES):
        return _export_size(image)
    if image.startswith(TRANSFER_PREFIXES):
        return _upstream_size(image, access)
    if fmt != RAW:
        return _virtual_size(os.path.abspath(image))
    return _file_size(os.path.abspath(image))


def _virtual_size(path: str) -> int:
    from diskferry.client import imageformat

    try:
        info = imageformat.qemu_img_info(path, "qemu-img")
        return int(str(info["virtual-size"]))
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ControlError(f"cannot read the virtual size of {path}: {e}; "
                           f"give --size") from e


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
