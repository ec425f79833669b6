"""Local images in any format qemu reads: what to serve, what to create.

A copy to or from a local image that is not raw goes through
``qemu-nbd`` (``qemunbd``). This module decides what it serves, as a
blockdev tree, so that nothing is guessed at open time:

- a source: its format driver over its file, or over a byte range of a
  tar archive for a member of an OVA (read in place, never extracted);
  with its whole backing chain (the guest's disk), or ``"backing":
  null`` for one layer alone;
- a destination: a new image made with ``qemu-img create``, optionally
  over a backing file named relative to it, as backup chains need.

Before anything is served, ``qemu-img info --backing-chain`` opens the
source the same way: a missing backing file, an encrypted image or a
format qemu cannot read fails here, before any byte is written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from typing import Any

from diskferry.client import imageformat
from diskferry.client.archive import member_location
from diskferry.client.errors import UnsupportedFormat
from diskferry.client.qemunbd import blockdev_filename

#: Formats a download can create.
DESTINATION_FORMATS = ("raw", "qcow2")

#: Seconds qemu-img may take to open a chain or create an image.
QEMU_IMG_TIMEOUT = 60.0


@dataclass(frozen=True)
class Source:
    """A local image to serve read-only: its blockdev tree and size."""

    spec: dict[str, object]
    format: str
    size: int
    #: What ``qemu-img info`` says of each layer opened to read it, top
    #: first (one for a single layer or no backing).
    chain: tuple[dict[str, Any], ...]


def _qemu_img() -> str:
    binary = shutil.which("qemu-img")
    if binary is None:
        raise FileNotFoundError(
            "qemu-img not found: it is needed for images that are not raw "
            "(Debian package qemu-utils)")
    return binary


def run_qemu_img(*args: str) -> str:
    """Run qemu-img; return its output or raise ``RuntimeError`` with its
    message."""
    try:
        return imageformat.run_qemu_img(_qemu_img(), *args,
                                        timeout=QEMU_IMG_TIMEOUT)
    except RuntimeError as e:
        raise RuntimeError(str(e).removeprefix("qemu-img: ")) from e


def file_node(path: str, offset: int = 0,
              size: int | None = None) -> dict[str, object]:
    """The protocol node: a file, or a byte range of one."""
    driver = "host_device" if _is_block_device(path) else "file"
    node: dict[str, object] = {"driver": driver,
                               "filename": os.path.abspath(path)}
    if size is None:
        return node
    return {"driver": "raw", "offset": offset, "size": size, "file": node}


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def source_spec(path: str, fmt: str, *, member: str | None = None,
                single_layer: bool = False) -> dict[str, object]:
    """The blockdev tree that reads image ``path`` (or its tar member)
    in format ``fmt``."""
    if member is not None:
        offset, size = member_location(path, member)
        node = file_node(path, offset, size)
    else:
        node = file_node(path)
    spec: dict[str, object] = {"driver": fmt, "file": node}
    if single_layer:
        spec["backing"] = None
    return spec


def open_source(path: str, fmt: str, *, member: str | None = None,
                single_layer: bool = False) -> Source:
    """Check that qemu reads the source whole, before serving it.

    Raises ``UnsupportedFormat`` for an encrypted image, a backing file
    that cannot be opened, or anything else qemu refuses, with qemu's
    own words.
    """
    label = f"{path} member {member}" if member else path
    spec = source_spec(path, fmt, member=member, single_layer=single_layer)
    try:
        out = run_qemu_img("info", "--output=json", "--backing-chain", "-U",
                           blockdev_filename(spec))
        chain = json.loads(out)
    except (OSError, RuntimeError, ValueError) as e:
        raise UnsupportedFormat(f"{label}: qemu cannot read it as {fmt}: {e}",
                                path=path, format=fmt) from e
    if isinstance(chain, dict):
        chain = [chain]
    if not chain or not isinstance(chain[0], dict):
        raise UnsupportedFormat(f"{label}: qemu-img info gave no image",
                                path=path, format=fmt)
    for layer in chain:
        if layer.get("encrypted"):
            raise UnsupportedFormat(
                f"{label}: {layer.get('filename', 'a layer')} is encrypted; "
                f"decrypt it first (qemu-img convert with its key to raw or "
                f"an unencrypted qcow2)", path=path, format=fmt)
    return Source(spec, fmt, int(chain[0]["virtual-size"]), tuple(chain))


def backing_format(path: str) -> str:
    """The format of an existing backing image, as qemu-img sees it."""
    try:
        info = json.loads(run_qemu_img("info", "--output=json", "-U",
                                       os.path.abspath(path)))
        return str(info["format"])
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UnsupportedFormat(f"backing file {path}: {e}", path=path,
                                format="unknown") from e


def create(path: str, fmt: str, size: int, *,
           backing: str | None = None) -> None:
    """Create image ``path`` of ``size`` bytes; over ``backing`` (a path
    from here, written into the header relative to ``path``'s folder,
    with its format) when given."""
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        relative = os.path.relpath(os.path.abspath(backing),
                                   os.path.dirname(os.path.abspath(path)))
        args += ["-b", relative, "-F", backing_format(backing)]
    args += [path, str(size)]
    try:
        run_qemu_img(*args)
    except (OSError, RuntimeError) as e:
        raise UnsupportedFormat(f"{path}: cannot create a {fmt} image: {e}",
                                path=path, format=fmt) from e


def destination_spec(path: str, fmt: str) -> dict[str, object]:
    """The blockdev tree that writes image ``path`` (its backing, if
    any, opened as its header names it)."""
    return {"driver": fmt, "file": file_node(path)}


def supports_direct_io(path: str) -> bool:
    """Whether the file system under ``path`` takes O_DIRECT (tmpfs does
    not), so that qemu-nbd may bypass the page cache."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True
