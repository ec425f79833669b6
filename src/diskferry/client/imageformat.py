"""What format is this local image in? Asked before an upload sends it.

An upload copies a guest's disk into a raw target. A qcow2, vmdk or OVA
file copied byte for byte becomes a disk holding a container instead of
the guest's data: the transfer succeeds and the disk is corrupt. So the
source is probed first: raw is sent as it is, a format qemu reads is
read through qemu-nbd (the guest-visible disk), and anything else (an
encrypted or compressed file, an archive without a member named) is
refused before a request is sent, unless the user said ``format="raw"``
(upload the bytes as they are).

Two witnesses, and the source is raw only when neither objects::

    qemu-img info --output=json -U /abs/path   (when qemu-img is on PATH)
    magic bytes of the open file: head and last 512 bytes (always)

- ``qemu-img`` knows every format qemu reads and checks more than a
  magic number; it is run with ``-U`` (no lock, so an image in use can
  be probed) on the absolute path (so a name such as ``json:{...}`` or
  ``nbd:...`` is never taken for a protocol). ``qemu-img info`` opens no
  backing file, and nothing here writes.
- Magic bytes cover what qemu-img calls raw but is not a disk (an OVA
  or tar archive, a fixed VHD whose only header is its footer, a
  compressed image) and stand in for qemu-img where it is absent.
- When qemu-img fails (a raw disk that happens to start with a qcow2
  magic, a damaged image), the source is refused too, naming what its
  magic says: guessing "raw" is how corruption starts.

``detect_magic`` is a pure function over bytes (table tests); ``probe``
does the I/O.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from diskferry.client.errors import UnsupportedFormat
from diskferry.logformat import escape

RAW = "raw"

#: Bytes read from the start: the furthest magic (tar's, at 257) and
#: vdi's signature (at 64) fit with room to spare.
HEAD_SIZE = 4096

#: Bytes read from the end: a fixed VHD's footer.
TAIL_SIZE = 512

#: Seconds qemu-img may take to probe: it reads a few headers, but a
#: slow or hung device must not hang the upload forever.
QEMU_IMG_TIMEOUT = 30.0

#: (offset, magic, format). A negative offset counts from the end of
#: the file. The first match wins.
MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QFI\xfb\x00\x00\x00\x01", "qcow"),
    (0, b"QFI\xfb", "qcow2"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"QED\x00", "qed"),
    (0, b"conectix", "vpc"),
    (-TAIL_SIZE, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (-TAIL_SIZE, b"koly", "dmg"),
    (257, b"ustar", "tar"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (0, b"\x1f\x8b\x08", "gzip"),
)

#: Formats copied through qemu-nbd (the guest's disk, not the file).
QEMU_FORMATS = frozenset({
    "qcow2", "qcow", "vmdk", "vdi", "vhdx", "qed", "vpc", "parallels",
    "bochs", "dmg", "cloop",
})

#: What to do to upload the disk a source in a format holds, for the
#: formats an upload cannot read as they are.
CONVERT = "convert it first (qemu-img convert -O raw {path} DISK.raw)"
ADVICE = {
    "luks": ("convert it first with its key (qemu-img convert --object "
             "secret,id=s0,file=KEYFILE --image-opts "
             "driver=luks,key-secret=s0,file.filename={path} -O raw "
             "DISK.raw)"),
    "tar": ("name the disk image inside it with {member} (an OVA holds "
            "its disks as members{members})"),
    "xz": "decompress it first (xz -dk {path})",
    "zstd": "decompress it first (zstd -d {path})",
    "gzip": "decompress it first (gzip -dk {path})",
}

#: How a format is called in a message, where "a FORMAT image" is wrong.
NOUNS = {
    "tar": "tar archive",
    "xz": "xz-compressed file",
    "zstd": "zstd-compressed file",
    "gzip": "gzip-compressed file",
}

#: ``Probe.detail`` when qemu-img is absent, and how it starts when
#: qemu-img could not open the source.
NO_QEMU_IMG = "qemu-img not found"
QEMU_IMG_FAILED = "qemu-img cannot open it"

#: Formats named by ``qemu-img info`` that mean "the bytes are the disk".
RAW_FORMATS = frozenset({RAW})


@dataclass(frozen=True)
class Probe:
    """What a source was found to be: ``format`` ("raw", "qcow2", ...,
    or "unknown"), ``by`` ("qemu-img" or "magic"), and ``detail``: what
    else is worth telling (a backing file, encryption, qemu-img's error)."""

    format: str
    by: str
    detail: str = ""
    #: For an archive: its file members, comma-separated.
    members: str = ""

    @property
    def raw(self) -> bool:
        return self.format in RAW_FORMATS


def detect_magic(head: bytes, tail: bytes = b"") -> str | None:
    """The format whose magic ``head`` (the file's first bytes) or
    ``tail`` (its last ``TAIL_SIZE`` bytes) carries, or None."""
    for offset, magic, name in MAGICS:
        if offset >= 0:
            found = head[offset:offset + len(magic)] == magic
        else:
            start = len(tail) + offset
            found = start >= 0 and tail[start:start + len(magic)] == magic
        if found:
            return name
    return None


def read_ends(fd: int, size: int) -> tuple[bytes, bytes]:
    """The first ``HEAD_SIZE`` and last ``TAIL_SIZE`` bytes at ``fd``."""
    head = os.pread(fd, min(HEAD_SIZE, size), 0)
    tail = os.pread(fd, TAIL_SIZE, size - TAIL_SIZE) if size >= TAIL_SIZE else b""
    return head, tail


def run_qemu_img(qemu_img: str, *args: str,
                 timeout: float = QEMU_IMG_TIMEOUT) -> str:
    """Run qemu-img; its output, or ``RuntimeError`` with its message."""
    try:
        proc = subprocess.run([qemu_img, *args], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"qemu-img {args[0]} did not answer in {timeout:.0f} s") from e
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(message or
                           f"qemu-img {args[0]} exited {proc.returncode}")
    return proc.stdout.decode("utf-8", "replace")


def qemu_img_info(path: str, qemu_img: str) -> dict[str, object]:
    """``qemu-img info`` of ``path`` with the format probed by qemu;
    raise ``RuntimeError`` with qemu-img's message when it fails."""
    out = run_qemu_img(qemu_img, "info", "--output=json", "-U",
                       os.path.abspath(path))
    try:
        info = json.loads(out)
    except ValueError as e:
        raise RuntimeError(f"qemu-img info gave no JSON: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("format"), str):
        raise RuntimeError("qemu-img info named no format")
    return info


def _qemu_detail(info: dict[str, object]) -> str:
    notes: list[str] = []
    if info.get("encrypted"):
        notes.append("encrypted")
    backing = info.get("backing-filename")
    if isinstance(backing, str):
        notes.append(f"over backing file {backing}")
    return ", ".join(notes)


def probe(path: str, fd: int, size: int, qemu_img: str | None = None) -> Probe:
    """Probe the source open at ``fd`` (``path`` names it for qemu-img).

    ``qemu_img`` is the command to run; None finds it on PATH, and
    without it the magic bytes decide alone.
    """
    head, tail = read_ends(fd, size)
    magic = detect_magic(head, tail)
    qemu_img = qemu_img or shutil.which("qemu-img")
    if qemu_img is None:
        return Probe(magic or RAW, "magic", NO_QEMU_IMG)
    try:
        info = qemu_img_info(path, qemu_img)
    except (OSError, RuntimeError) as e:
        return Probe(magic or "unknown", "magic", f"{QEMU_IMG_FAILED}: {e}")
    fmt = str(info["format"])
    if fmt in RAW_FORMATS and magic is not None:
        return Probe(magic, "magic", "found by its magic bytes")
    return Probe(fmt, "qemu-img", _qemu_detail(info))


def refusal(path: str, found: Probe, force: str,
            member: str = "--member NAME") -> str:
    """One line saying why ``path`` is not uploaded and what to do;
    ``force`` is how the caller spells "raw, as it is", ``member`` how it
    names a member of an archive."""
    if found.format in QEMU_FORMATS and found.detail == NO_QEMU_IMG:
        text = (f"{path} is a {found.format} image: reading it needs "
                f"qemu-img and qemu-nbd (Debian package qemu-utils), which "
                f"are not installed; to upload its bytes as they are, pass "
                f"{force}")
    elif found.format == "unknown":
        text = (f"{path}: cannot tell its format ({found.detail}); if it is "
                f"a raw disk image, pass {force} to upload its bytes as "
                f"they are")
    else:
        noun = NOUNS.get(found.format, f"{found.format} image")
        detail = f" ({found.detail})" if found.detail else ""
        listed = f": {found.members}" if found.members else ""
        todo = ADVICE.get(found.format, CONVERT).format(
            path=path, member=member, members=listed)
        text = (f"{path} is a {noun}{detail}, not a raw disk image: "
                f"uploading it would write the {found.format} container "
                f"into the disk. To upload the disk it holds, {todo}; to "
                f"upload its bytes as they are, pass {force}")
    return escape(text)


def source_format(path: str, fd: int, size: int, fmt: str | None,
                  force: str = 'format="raw"',
                  member: str | None = None) -> str:
    """The format to read the source in: "raw" (its bytes are the disk)
    or a qemu driver (read through qemu-nbd); raise ``UnsupportedFormat``
    for a source an upload would corrupt or cannot read.

    ``fmt`` is the format the caller asked for (None: probe). With
    ``member`` (a file inside a tar archive such as an OVA), the
    member's own head is probed.
    """
    if fmt is not None:
        if fmt != RAW and fmt not in QEMU_FORMATS:
            raise UnsupportedFormat(
                escape(f"format {fmt!r} is not one diskferry reads (raw, "
                       f"{', '.join(sorted(QEMU_FORMATS))})"),
                path=path, format=fmt)
        return fmt
    if member is not None:
        return _member_format(path, fd, member)
    found = probe(path, fd, size)
    if found.raw:
        return found.format
    if found.format in QEMU_FORMATS:
        if found.detail != NO_QEMU_IMG and \
                not found.detail.startswith(QEMU_IMG_FAILED):
            return found.format
    if found.format == "tar":
        from diskferry.client import archive

        found = Probe("tar", found.by, found.detail,
                      ", ".join(archive.members(path)))
    raise UnsupportedFormat(refusal(path, found, force), path=path,
                            format=found.format, probe=found)


def _member_format(path: str, fd: int, member: str) -> str:
    """The format of a member, by its magic: qemu-img cannot open a byte
    range by a plain name, and formats.open_source checks it after."""
    from diskferry.client import archive

    offset, length = archive.member_location(path, member)
    head = os.pread(fd, min(HEAD_SIZE, length), offset)
    tail = os.pread(fd, min(TAIL_SIZE, length),
                    offset + length - min(TAIL_SIZE, length))
    found = detect_magic(head, tail if length >= TAIL_SIZE else b"") or RAW
    if found != RAW and found not in QEMU_FORMATS:
        raise UnsupportedFormat(
            escape(f"{path} member {member} is a "
                   f"{NOUNS.get(found, found + ' image')}, which cannot be "
                   f"uploaded from inside the archive"),
            path=path, format=found)
    return found


def path_format(path: str, fmt: str | None = None,
                member: str | None = None) -> str:
    """``source_format`` of the image at ``path``, opened for the probe."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return source_format(path, fd, size, fmt, member=member)
    finally:
        os.close(fd)
