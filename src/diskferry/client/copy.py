"""Whole images between a local image and a transfer URL.

``upload`` and ``download`` are the library's front door. Each checks
its options (``rules``), picks the local end of the copy from a table,
by the local image's kind, and runs the engine (``engine``: planned
pieces, parallel connections, retries from the last acknowledged byte)
between it and the server::

    upload    "stream"  standard input            stream.StreamSource
              "raw"     raw file or block device  raw.RawSource (sendfile)
              "image"   qcow2 chain, in place     mapped.MappedSource
                        any other qemu format     imagecopy.NbdSource
    download  "stream"  standard output           stream.StreamDestination
              "raw"     raw file or block device  raw.RawDestination (splice)
              "qcow2"   a new qcow2               qcow2.Destination
              "overlay" qcow2 over a backing file imagecopy.NbdDestination

An upload's kind is found by probing the source (``imageformat``); an
image is read in place when its data lies plain in its files, else
through qemu-nbd. Modules for images are imported only when used.
"""

from __future__ import annotations

import logging
import os
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Unpack

from diskferry.client import engine, imageformat, localfile, session
from diskferry.client import extents as _extents
from diskferry.client import resume as _resume
from diskferry.client.engine import (
    DEFAULT_REQUEST_SIZE,
    DEFAULT_WORKERS,
    DownloadPieces,
    TransferResult,
    UploadPieces,
)
from diskferry.client.errors import HTTPError, TransferError
from diskferry.client.piece import Progress
from diskferry.client.policy import Retry, Timeout
from diskferry.client.rules import (
    STREAM,
    OptionConflict,
    download_conflict,
    upload_conflict,
)
from diskferry.client.sender import SKIPPED, Sender
from diskferry.extent import Extent

if TYPE_CHECKING:
    from diskferry.client.local import Destination, Source
    from diskferry.client.localfile import LocalImage, LocalPath

__all__ = ["DEFAULT_REQUEST_SIZE", "DEFAULT_WORKERS", "STREAM",
           "TransferResult", "download", "upload"]

log = logging.getLogger("diskferry.client")


# Records here are named tuples and plain classes, not dataclasses: a
# dataclass costs about a millisecond to define, at every command's start.
# For the same reason, each end of a copy is imported when it is used.


class CopyOptions(session.ConnectionOptions, total=False):
    """The keywords ``upload()`` and ``download()`` share; ``_Job`` gives
    their defaults."""

    workers: int
    request_size: int
    retry: Retry
    progress: Callable[[int], None] | None
    on_start: Callable[[int], None] | None


class _Job:
    """How a copy runs, whatever its direction: the ``CopyOptions``, the
    user's progress serialized (``report``), and when it started."""

    __slots__ = ("workers", "request_size", "cafile", "secure", "unix",
                 "timeout", "retry", "report", "on_start", "started")

    def __init__(self, *, workers: int = DEFAULT_WORKERS,
                 request_size: int = DEFAULT_REQUEST_SIZE,
                 cafile: str | None = None, secure: bool = True,
                 unix: str = "auto", timeout: Timeout = Timeout(),
                 retry: Retry = Retry(),
                 progress: Callable[[int], None] | None = None,
                 on_start: Callable[[int], None] | None = None) -> None:
        self.workers = workers
        self.request_size = request_size
        self.cafile = cafile
        self.secure = secure
        self.unix = unix
        self.timeout = timeout
        self.retry = retry
        self.report = Progress(progress)
        self.on_start = on_start
        self.started = time.monotonic()

    def open(self, url: str, mode: str) -> session.Session:
        return session.open(url, mode, cafile=self.cafile,
                            secure=self.secure, unix=self.unix,
                            timeout=self.timeout,
                            buffer_size=self.request_size)


class _SourcePlan(namedtuple("_SourcePlan", "path local format member "
                             "single_layer detect_zeros size")):
    """What opens an upload's source: ``local`` is the open file (None
    for standard input), ``format`` the one to read it in."""

    __slots__ = ()
    path: LocalPath
    local: LocalImage | None
    format: str | None
    member: str | None
    single_layer: bool
    detect_zeros: bool
    size: int | None

    def file(self) -> LocalImage:
        if self.local is None:
            raise ValueError(f"{self.path}: no file opened")
        return self.local


def _stream_source(plan: _SourcePlan, job: _Job) -> Source:
    from diskferry.client.stream import StreamSource

    return StreamSource(plan.size, job.request_size, plan.detect_zeros)


def _raw_source(plan: _SourcePlan, job: _Job) -> Source:
    from diskferry.client.raw import RawSource

    log.debug("%s: read as raw", plan.path)
    return RawSource(plan.file())


def _image_source(plan: _SourcePlan, job: _Job) -> Source:
    """An image in a format qemu reads: from its files when its data lies
    plain in them (``mapped``), else through qemu-nbd."""
    from diskferry.client import formats, imagecopy, mapped

    path, fmt = os.fsdecode(plan.path), plan.format or imageformat.RAW
    image = formats.open_source(path, fmt, member=plan.member,
                                single_layer=plan.single_layer)
    layout = mapped.plain_layout(path, image)
    if layout is not None:
        log.debug("%s: %s read in place from %d file(s)", path, fmt,
                  len(layout.files))
        return mapped.MappedSource(layout, image.size,
                                   single_layer=plan.single_layer,
                                   detect_zeros=plan.detect_zeros)
    log.debug("%s: %s read through qemu-nbd", path, fmt)
    return imagecopy.NbdSource(
        path, image, single_layer=plan.single_layer,
        connections=job.workers, request_size=job.request_size,
        detect_zeros=plan.detect_zeros)


#: What reads an upload's source, by its kind (``_source_kind``).
SOURCES: dict[str, Callable[[_SourcePlan, _Job], Source]] = {
    "stream": _stream_source,
    "raw": _raw_source,
    "image": _image_source,
}


def _source_kind(plan: _SourcePlan) -> tuple[str, _SourcePlan]:
    """The source's kind, and its plan with the format to read it in
    (probed unless given)."""
    if plan.local is None:
        return "stream", plan
    fmt = imageformat.source_format(os.fsdecode(plan.path), plan.local.fd,
                                    plan.local.size, plan.format,
                                    member=plan.member)
    kind = "raw" if fmt == imageformat.RAW and plan.member is None \
        else "image"
    return kind, plan._replace(format=fmt)


def upload(path: LocalPath, url: str, *, format: str | None = None,
           member: str | None = None, single_layer: bool = False,
           detect_zeros: bool = True, size: int | None = None,
           **options: Unpack[CopyOptions]) -> TransferResult:
    """Upload the disk image at ``path`` to transfer ``url``.

    ``options``: ``workers`` (default 4, at most the server's
    ``max_writers``), ``request_size`` (default 8 MiB), ``cafile``,
    ``secure``, ``unix`` and ``timeout`` as for ``open()``, ``retry`` (a
    ``Retry``), ``progress`` and ``on_start`` (below).

    ``path="-"`` reads a raw stream from standard input: ``size`` bytes
    (default: the image's size), in order, on one connection.

    ``format`` None probes the source first (``imageformat``): raw is sent
    as it is, a format qemu reads (qcow2 with its backing chain, vmdk,
    vdi, vhdx, ...) is read as the guest sees it (a plain qcow2 chain in
    place, anything else through qemu-nbd), and anything else raises
    ``UnsupportedFormat`` before any request. ``format="raw"`` uploads
    the bytes as they are; another format names the qemu driver.
    ``member`` names a disk inside a tar archive (an OVA), read in place.
    ``single_layer`` uploads the top layer of a chain alone: what it
    leaves unallocated is left untouched in the destination.

    Holes of the source are zeroed with PATCH zero, except where the
    destination already reads zeros (its extents say so). With
    ``detect_zeros``, zero runs inside the data of an image that is not
    raw, or of standard input, are sent as zero too, or not at all where
    the destination already reads zeros. ``progress(n)`` is called as
    ``n`` more bytes of the image are done, ``on_start(size)`` once the
    size to copy is known (the source's: what the progress adds up to).
    Options that cannot work together raise ``OptionConflict``
    (``rules``).
    """
    conflict = upload_conflict(path, format=format, member=member,
                               single_layer=single_layer, size=size)
    if conflict is not None:
        raise OptionConflict(conflict)
    job = _Job(**options)
    local = None if path == STREAM else localfile.open_source(path)
    try:
        kind, plan = _source_kind(_SourcePlan(
            path, local, format, member, single_layer, detect_zeros, size))
        with SOURCES[kind](plan, job) as source, job.open(url, "w") as sess:
            return _send(sess, source, path, job)
    finally:
        if local is not None:
            local.close()


def _send(sess: session.Session, source: Source, path: LocalPath,
          job: _Job) -> TransferResult:
    """Send ``source`` whole: its data, and zeros where the destination
    does not already read them."""
    size = sess.size()
    source_size = source.sized(size)
    if job.on_start:
        job.on_start(source_size)
    if source_size > size:
        what = "standard input (--size)" if path == STREAM else path
        raise TransferError(
            f"{what} ({source_size} bytes) is larger than the image "
            f"({size} bytes): upload it to a ticket of at least "
            f"{source_size} bytes")
    src_extents = source.extents()
    zero_ranges = _extents.ranges(
        (e for e in src_extents if not (source.keeps_holes and e.hole)),
        zero=True)
    known = engine.destination_zeros(sess) \
        if zero_ranges or source.finds_zeros else []
    needed = _extents.subtract(zero_ranges, known)
    # Servers without the flush feature flush every PUT anyway.
    flush_each = "flush" not in sess.features
    pieces = engine.plan(src_extents, job.request_size, needed)
    skipped = sum(e.length for e in src_extents if e.zero) - sum(
        e - s for s, e in needed)
    job.report(skipped)
    sender = Sender(sess.features, flush_each, known)
    count = 1 if source.sequential else \
        max(1, min(job.workers, sess.max_writers))
    engine.run(pieces, engine.open_connections(sess, count),
               UploadPieces(source, sender), job.retry, job.report,
               prefetch=source.prefetch if source.reads_ahead else None)
    source.finish()
    if not flush_each:
        engine.flush(sess, job.retry)
    return engine.result("upload", size, sender.done,
                         skipped + sender.done[SKIPPED], job.started, sess,
                         count)


class _Target(namedtuple("_Target", "path size format backing_file resume "
                         "detect_zeros extents")):
    """What opens a download's destination: ``extents`` are the image's,
    a list when the destination plans ahead."""

    __slots__ = ()
    path: LocalPath
    size: int
    format: str
    backing_file: str | None
    resume: bool
    detect_zeros: bool
    extents: Iterable[Extent]


def _stream_destination(target: _Target, job: _Job) -> Destination:
    from diskferry.client.stream import StreamDestination

    return StreamDestination()


def _raw_destination(target: _Target, job: _Job) -> Destination:
    from diskferry.client.raw import RawDestination

    return RawDestination(target.path, target.size, target.resume)


def _qcow2_destination(target: _Target, job: _Job) -> Destination:
    from diskferry.client import qcow2

    log.debug("%s: a new qcow2, written by the client", target.path)
    return qcow2.Destination(
        os.fsdecode(target.path), target.size,
        [(e.start, e.end) for e in target.extents if not e.zero],
        detect_zeros=target.detect_zeros)


def _overlay_destination(target: _Target, job: _Job) -> Destination:
    from diskferry.client import imagecopy

    log.debug("%s: a qcow2 overlay of %s, written through qemu-nbd",
              target.path, target.backing_file)
    return imagecopy.NbdDestination(
        os.fsdecode(target.path), target.format, target.size,
        backing_file=target.backing_file, connections=job.workers,
        request_size=job.request_size, detect_zeros=target.detect_zeros)


class DestinationKind(namedtuple("DestinationKind", "open plans_ahead",
                                 defaults=(False,))):
    """How a download's destination is opened; ``plans_ahead`` when it
    needs every extent before the first byte (it lays the image out)."""

    __slots__ = ()
    open: Callable[[_Target, _Job], Destination]
    plans_ahead: bool


#: What writes a download's destination, by its kind (``_target_kind``).
DESTINATIONS: dict[str, DestinationKind] = {
    "stream": DestinationKind(_stream_destination),
    "raw": DestinationKind(_raw_destination),
    "qcow2": DestinationKind(_qcow2_destination, plans_ahead=True),
    "overlay": DestinationKind(_overlay_destination),
}


def _target_kind(path: LocalPath, format: str, backing_file: str | None) -> str:
    if path == STREAM:
        return "stream"
    if format == imageformat.RAW:
        return "raw"
    return "qcow2" if backing_file is None else "overlay"


def download(url: str, path: LocalPath, *, format: str = "raw",
             backing_file: str | None = None, incremental: bool = False,
             detect_zeros: bool = True, resume: bool = False,
             **options: Unpack[CopyOptions]) -> TransferResult:
    """Download transfer ``url`` into a local image at ``path``.

    ``format="raw"``: a regular file is written as ``PATH.part``, sparse
    (zero ranges are not transferred and stay holes), and renamed to
    ``path`` once every byte is written and synced; a block device is
    written in place, its zero ranges zeroed locally. What is synced is
    recorded in a journal beside the ``.part`` (``resume``), which is
    kept when the download fails or is interrupted: ``resume=True``
    continues from it. ``path="-"`` writes a raw stream to standard
    output, in order, on one connection; a reader that goes away
    raises ``OutputClosed``.

    ``format="qcow2"`` writes a new qcow2 image itself (``qcow2``), or,
    over ``backing_file`` (a relative name is relative to ``path``'s
    folder, as qemu-img names a backing file), creates one with
    qemu-img and writes it through qemu-nbd; zero ranges are written
    only where they must hide backing data.
    ``incremental`` (with a backing file, the previous backup) copies
    only the transfer's dirty extents, so the new image is an overlay
    that reads as the disk reads now. ``options`` as for ``upload()``
    (``workers`` at most the server's ``max_readers``); options that
    cannot work together raise ``OptionConflict``.
    """
    conflict = download_conflict(path, format=format,
                                 backing_file=backing_file,
                                 incremental=incremental, resume=resume)
    if conflict is not None:
        raise OptionConflict(conflict)
    job = _Job(**options)
    kind = DESTINATIONS[_target_kind(path, format, backing_file)]
    if backing_file is not None:
        backing_file = localfile.backing_path(path, backing_file)
    with job.open(url, "r") as sess:
        size = sess.size()
        extents = _image_extents(sess, size, incremental)
        if kind.plans_ahead:
            extents = list(extents)
        target = _Target(path, size, format, backing_file, resume,
                         detect_zeros, extents)
        with kind.open(target, job) as dst:
            done, skipped, count = _receive(sess, dst, target, incremental,
                                            job)
        return engine.result("download", size, done, skipped, job.started,
                             sess, count)


def _image_extents(sess: session.Session, size: int,
                   incremental: bool) -> Iterable[Extent]:
    """The extents a download walks: dirty ones for an incremental copy,
    else the zero context (or all data, for servers without extents)."""
    if incremental:
        return _dirty_extents(sess)
    if "extents" in sess.features:
        return sess.walk_extents("zero")
    return [Extent(0, size, False)] if size else []


def _receive(sess: session.Session, dst: Destination, target: _Target,
             incremental: bool,
             job: _Job) -> tuple[dict[str, int], int, int]:
    """Receive what ``dst`` lacks; return the bytes done per op, the
    bytes skipped, and the connections used."""
    if job.on_start:
        job.on_start(target.size)
    done_before = dst.done
    job.report(_resume.done_bytes(done_before))
    selected = _Selected(_resume.remaining(target.extents, done_before),
                         incremental, dst.zeroed, job.report,
                         _resume.done_bytes(done_before))
    count = 1 if dst.sequential else \
        max(1, min(job.workers, sess.max_readers))
    done = engine.run(engine.plan(selected, job.request_size),
                      engine.open_connections(sess, count),
                      DownloadPieces(dst), job.retry, job.report)
    dst.commit()
    return done, selected.skipped, count


class _Selected:
    """What a download writes, lazily; the rest is counted in
    ``skipped``: zeros a fresh image already reads, and the clean ranges
    an incremental copy leaves to the backing file."""

    def __init__(self, extents: Iterable[Extent], incremental: bool,
                 zeroed: bool, report: Progress, skipped: int) -> None:
        self._extents = extents
        self._incremental = incremental
        self._zeroed = zeroed
        self._report = report
        self.skipped = skipped

    def __iter__(self) -> Iterator[Extent]:
        for ext in self._extents:
            if (self._incremental and not ext.dirty) or \
                    (ext.zero and self._zeroed):
                self.skipped += ext.length
                self._report(ext.length)
            else:
                yield ext


def _dirty_extents(sess: session.Session) -> Iterator[Extent]:
    """The transfer's dirty extents; a clear error when it has none."""
    try:
        yield from sess.walk_extents("dirty")
    except HTTPError as e:
        if e.status == 404:
            raise TransferError(
                "the transfer has no dirty extents (its ticket is not "
                "dirty, or its export has no bitmap): download it whole, "
                "without --incremental") from e
        raise
