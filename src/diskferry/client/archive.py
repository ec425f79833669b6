"""Disk images inside a tar archive (an OVA), read in place.

A member is a byte range of the archive: ``imageformat`` probes its
head there and ``formats`` serves that range to qemu, so nothing is
ever extracted.
"""

from __future__ import annotations

import tarfile

from diskferry.client.errors import UnsupportedFormat


def member_location(path: str, name: str) -> tuple[int, int]:
    """Offset and size of member ``name`` of tar archive ``path``
    (an OVA); ``UnsupportedFormat`` naming the members when absent."""
    try:
        with tarfile.open(path, "r:") as archive:
            members = archive.getmembers()
    except (OSError, tarfile.TarError) as e:
        raise UnsupportedFormat(f"{path}: not a readable tar archive: {e}",
                                path=path, format="tar") from e
    for member in members:
        if member.name == name:
            if not member.isfile():
                break
            return member.offset_data, member.size
    names = ", ".join(m.name for m in members if m.isfile()) or "none"
    raise UnsupportedFormat(
        f"{path} has no file member {name!r} (its members: {names})",
        path=path, format="tar")


def members(path: str) -> list[str]:
    """Names of the file members of tar archive ``path``."""
    try:
        with tarfile.open(path, "r:") as archive:
            return [m.name for m in archive.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError):
        return []
