"""Which options of a copy cannot work together, said once.

``upload_conflict`` and ``download_conflict`` return the first rule a
set of options breaks, or None. ``upload()`` and ``download()`` raise
``OptionConflict`` for it before any request; the command line asks the
same functions first and words the rule in its own flags.
"""

from __future__ import annotations

import enum

from diskferry.client.imageformat import RAW
from diskferry.client.localfile import LocalPath

#: The path that names standard input (upload) or output (download): a
#: raw stream, read or written in order by one connection.
STREAM = "-"

#: Formats a download can write.
DOWNLOAD_FORMATS = ("raw", "qcow2")


class Rule(enum.Enum):
    """A rule of options; its value is how the library says it."""

    VERIFY_SINGLE_LAYER = ("a checksum compares whole disks; a single "
                           "layer is not one")
    STREAM_UPLOAD_FORMAT = ("standard input is read as a raw stream: no "
                            "format other than raw, no member")
    STREAM_REREAD = ("a checksum or a resume reads the image again: not "
                     "a stream")
    SIZE_WITHOUT_STREAM = "size is for standard input; a file has its own"
    INCREMENTAL_WITHOUT_BACKING = ("an incremental download needs a backing "
                                   "file (the previous backup)")
    BACKING_RAW = "a raw image has no backing file: download to qcow2"
    DOWNLOAD_FORMAT = "a download writes raw or qcow2"
    RESUME_NOT_RAW = "only a raw download can be resumed"
    STREAM_DOWNLOAD_FORMAT = ("standard output is written as a raw stream: "
                              "no format other than raw")


class OptionConflict(ValueError):
    """Raised before a copy starts when its options break ``rule``."""

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule.value)
        self.rule = rule


def upload_conflict(path: LocalPath, *, format: str | None, member: str | None,
                    single_layer: bool, size: int | None,
                    verify: bool = False) -> Rule | None:
    """The rule an upload of ``path`` with these options breaks."""
    if verify and single_layer:
        return Rule.VERIFY_SINGLE_LAYER
    if path == STREAM:
        if format not in (None, RAW) or member is not None:
            return Rule.STREAM_UPLOAD_FORMAT
        if verify:
            return Rule.STREAM_REREAD
        return None
    if size is not None:
        return Rule.SIZE_WITHOUT_STREAM
    return None


def download_conflict(path: LocalPath, *, format: str,
                      backing_file: str | None, incremental: bool,
                      resume: bool, verify: bool = False) -> Rule | None:
    """The rule a download into ``path`` with these options breaks."""
    if incremental and backing_file is None:
        return Rule.INCREMENTAL_WITHOUT_BACKING
    if backing_file is not None and format == RAW:
        return Rule.BACKING_RAW
    if format not in DOWNLOAD_FORMATS:
        return Rule.DOWNLOAD_FORMAT
    if resume and format != RAW:
        return Rule.RESUME_NOT_RAW
    if path == STREAM:
        if format != RAW:
            return Rule.STREAM_DOWNLOAD_FORMAT
        if verify or resume:
            return Rule.STREAM_REREAD
    return None
