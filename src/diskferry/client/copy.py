"""Whole images between a local file and a transfer URL.

``upload`` and ``download`` are the library's front door. A raw file or
block device is copied here, the kernel moving the bytes (``sendfile``
on upload, ``splice`` on download); so is the data of a qcow2 chain,
from where it lies in its files (``mapped``), and a new qcow2 is
written by the client itself (``qcow2``); any other format, an archive
member, or a download into a qcow2 overlay goes through qemu-nbd
(``imagecopy``). All run on the same engine (``engine``): planned
pieces, parallel connections, retries from the last acknowledged byte.
"""

import logging
import os
import stat
import time

from diskferry.client import engine, imageformat, localfile, session
from diskferry.client import extents as _extents
from diskferry.client import resume as _resume
from diskferry.client.engine import (
    DEFAULT_REQUEST_SIZE,
    DEFAULT_WORKERS,
    TransferResult,
)
from diskferry.client.errors import HTTPError, TransferError
from diskferry.client.policy import Retry, Timeout
from diskferry.extent import Extent

__all__ = ["DEFAULT_REQUEST_SIZE", "DEFAULT_WORKERS", "STREAM",
           "TransferResult", "download", "upload"]

#: The path that names standard input (upload) or output (download): a
#: raw stream, read or written in order by one connection.
STREAM = "-"

log = logging.getLogger("diskferry.client")


def upload(path, url, *, workers=DEFAULT_WORKERS,
           request_size=DEFAULT_REQUEST_SIZE, cafile=None, secure=True,
           unix="auto", timeout=Timeout(), retry=Retry(), progress=None,
           on_start=None, format=None, member=None, single_layer=False,
           detect_zeros=True, size=None):
    """Upload the disk image at ``path`` to transfer ``url``.

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
    raw are sent as zero too. ``progress(n)`` is called as ``n`` more
    bytes of the image are done, ``on_start(size)`` once the image size
    is known.
    """
    started = time.monotonic()
    report = engine.Progress(progress)
    if path == STREAM:
        if format not in (None, imageformat.RAW) or member is not None:
            raise ValueError("standard input is read as a raw stream: "
                             "no --format other than raw, no --member")
        local = None
    else:
        local = localfile.open_source(path)
    try:
        if local is None:
            source = _StreamSource(size, request_size, detect_zeros)
        else:
            source = _file_source(path, local, format, member, single_layer,
                                  workers, request_size, detect_zeros)
        with source, session.open(url, "w", cafile=cafile, secure=secure,
                                  unix=unix, timeout=timeout,
                                  buffer_size=request_size) as sess:
            size = sess.size()
            if source.size is None:
                source.size = size
            if on_start:
                on_start(size)
            if source.size > size:
                raise TransferError(
                    f"{path} ({source.size} bytes) is larger than the image "
                    f"({size} bytes)", size)
            src_extents = source.extents()
            zero_ranges = _extents.ranges(
                (e for e in src_extents
                 if not (source.keeps_holes and e.hole)), zero=True)
            known = engine.destination_zeros(sess) if zero_ranges else []
            needed = _extents.subtract(zero_ranges, known)
            # Servers without the flush feature flush every PUT anyway.
            flush_each = "flush" not in sess.features
            pieces = engine.plan(src_extents, request_size, needed)
            skipped = sum(e.length for e in src_extents if e.zero) - sum(
                e - s for s, e in needed)
            report(skipped)
            sender = engine.Sender(sess, flush_each, known, report)

            def do_piece(con, op, state, end):
                if op == "data":
                    source.send(con, state, end, sender)
                else:
                    sender.zero(con, state, end)

            count = 1 if source.sequential else \
                max(1, min(workers, sess.max_writers))
            engine.run(pieces, engine.open_connections(sess, count),
                       do_piece, retry, prefetch=source.prefetch)
            source.finish()
            if not flush_each:
                engine.flush(sess, retry)
            return engine.result("upload", size, sender.done,
                                 skipped + sender.done["skipped"], started,
                                 sess, count)
    finally:
        if local is not None:
            local.close()


def _file_source(path, local, format, member, single_layer, workers,
                 request_size, detect_zeros):
    """The source of an upload of a file or device: raw as it is; any
    other format from its files when its data lies plain in them
    (``mapped``), else through qemu-nbd."""
    fmt = imageformat.source_format(os.fsdecode(path), local.fd, local.size,
                                    format, member=member)
    if fmt == imageformat.RAW and member is None:
        log.debug("%s: read as raw", path)
        return _RawSource(local)
    from diskferry.client import formats, imagecopy, mapped

    path = os.fsdecode(path)
    image = formats.open_source(path, fmt, member=member,
                                single_layer=single_layer)
    layout = mapped.plain_layout(path, image)
    if layout is not None:
        log.debug("%s: %s read in place from %d file(s)", path, fmt,
                  len(layout.files))
        return mapped.MappedSource(layout, image.size,
                                   single_layer=single_layer,
                                   detect_zeros=detect_zeros)
    log.debug("%s: %s read through qemu-nbd", path, fmt)
    return imagecopy.NbdSource(
        path, image, single_layer=single_layer, connections=workers,
        request_size=request_size, detect_zeros=detect_zeros)


class _RawSource:
    """A raw file or block device: mapped with SEEK_DATA, sent by the
    kernel (sendfile or splice)."""

    keeps_holes = False
    sequential = False
    #: Nothing to read ahead: the kernel reads as it sends.
    prefetch = None

    def __init__(self, local):
        self._local = local
        self.size = local.size

    def extents(self):
        if self._local.kind == "file":
            return _extents.file_extents(self._local.fd, self.size)
        return [Extent(0, self.size, False)]

    def send(self, con, state, end, sender):
        offset = state["offset"]
        con.write_from_fd(self._local.fd, offset, end - offset,
                          flush=sender.flush_each)
        sender.acknowledged(state, end)

    def finish(self):
        """Every piece is sent: nothing to check for a file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _StreamSource(_RawSource):
    """Standard input: a raw stream of ``size`` bytes (None: the image's
    size), read in order. A piece is kept until the server acknowledges
    it, so that a retry sends it again without reading the stream twice;
    with ``detect_zeros``, a piece of zeros is sent as zero."""

    sequential = True

    def __init__(self, size, request_size, detect_zeros, fd=0):
        self.size = size
        self._fd = fd
        self._buf = bytearray(request_size)
        self._held = (-1, 0)
        self._zeros = bytes(request_size) if detect_zeros else None

    def extents(self):
        return [Extent(0, self.size, False)] if self.size else []

    def send(self, con, state, end, sender):
        offset = state["offset"]
        length = end - offset
        if self._held != (offset, length):
            self._fill(offset, length)
        view = memoryview(self._buf)[:length]
        if self._zeros is not None and view == self._zeros[:length]:
            sender.zero(con, state, end)
        else:
            sender.write(con, view, state)

    def _fill(self, offset, length):
        view = memoryview(self._buf)[:length]
        got = 0
        while got < length:
            n = os.readv(self._fd, [view[got:]])
            if not n:
                raise TransferError(
                    f"standard input ended after {offset + got} bytes; "
                    f"expected {self.size} (pass --size for a shorter "
                    f"stream)", offset + got)
            got += n
        self._held = (offset, length)

    def finish(self):
        if os.read(self._fd, 1):
            raise TransferError(
                f"standard input holds more than {self.size} bytes (the "
                f"image's size, or --size)", self.size)


def download(url, path, *, workers=DEFAULT_WORKERS,
             request_size=DEFAULT_REQUEST_SIZE, cafile=None, secure=True,
             unix="auto", timeout=Timeout(), retry=Retry(), progress=None,
             on_start=None, format="raw", backing_file=None,
             incremental=False, detect_zeros=True, resume=False):
    """Download transfer ``url`` into a local image at ``path``.

    ``format="raw"``: a regular file is written as ``PATH.part``, sparse
    (zero ranges are not transferred and stay holes), and renamed to
    ``path`` once every byte is written and synced; a block device is
    written in place, its zero ranges zeroed locally. What is synced is
    recorded in a journal beside the ``.part`` (``resume``), which is
    kept when the download fails or is interrupted: ``resume=True``
    continues from it. ``path="-"`` writes a raw stream to standard
    output, in order, on one connection.

    ``format="qcow2"`` writes a new qcow2 image itself (``qcow2``), or,
    over ``backing_file`` (named relative to it), creates one with
    qemu-img and writes it through qemu-nbd; zero ranges are written
    only where they must hide backing data.
    ``incremental`` (with a backing file, the previous backup) copies
    only the transfer's dirty extents, so the new image is an overlay
    that reads as the disk reads now. ``progress`` and ``on_start`` as
    for ``upload()``.
    """
    if incremental and backing_file is None:
        raise ValueError("an incremental download needs a backing file "
                         "(the previous backup)")
    if backing_file is not None and format == imageformat.RAW:
        raise ValueError("a raw image has no backing file: download to "
                         "qcow2")
    if format not in ("raw", "qcow2"):
        raise ValueError(f"cannot download into format {format!r} "
                         f"(raw or qcow2)")
    if resume and format != imageformat.RAW:
        raise ValueError("only a raw download can be resumed")
    if path == STREAM and format != imageformat.RAW:
        raise ValueError("standard output is written as a raw stream: no "
                         "--format other than raw")
    started = time.monotonic()
    report = engine.Progress(progress)
    with session.open(url, "r", cafile=cafile, secure=secure, unix=unix,
                      timeout=timeout, buffer_size=request_size) as sess:
        size = sess.size()
        if incremental:
            image_extents = _dirty_extents(sess)
        elif "extents" in sess.features:
            image_extents = sess.walk_extents("zero")
        else:
            image_extents = [Extent(0, size, False)] if size else []
        if path == STREAM:
            dst = _StreamDestination(size)
        elif format == imageformat.RAW:
            dst = _RawDestination(path, size, resume)
        elif backing_file is None:
            from diskferry.client import qcow2

            log.debug("%s: a new qcow2, written by the client", path)
            image_extents = list(image_extents)
            dst = qcow2.Destination(
                os.fsdecode(path), size,
                [(e.start, e.end) for e in image_extents if not e.zero],
                detect_zeros=detect_zeros)
        else:
            from diskferry.client import imagecopy

            log.debug("%s: a qcow2 overlay of %s, written through qemu-nbd",
                      path, backing_file)
            dst = imagecopy.NbdDestination(
                os.fsdecode(path), format, size, backing_file=backing_file,
                connections=workers, request_size=request_size,
                detect_zeros=detect_zeros)
        with dst:
            if on_start:
                on_start(size)
            done_before = dst.done
            skipped = _resume.done_bytes(done_before)
            report(skipped)
            image_extents = _resume.remaining(image_extents, done_before)

            def selected(extents):
                # What this download writes, lazily; the rest is counted:
                # zeros a fresh image already reads, and the clean ranges
                # an incremental copy leaves to the backing file.
                nonlocal skipped
                for ext in extents:
                    if (incremental and not ext.dirty) or \
                            (ext.zero and dst.zeroed):
                        skipped += ext.length
                        report(ext.length)
                    else:
                        yield ext

            pieces = engine.plan(selected(image_extents), request_size)

            def do_piece(con, op, state, end):
                if op == "data":
                    dst.receive(con, state, end, report)
                else:
                    dst.zero(state["offset"], end - state["offset"])
                    report(end - state["offset"])
                    state["offset"] = end

            count = 1 if dst.sequential else \
                max(1, min(workers, sess.max_readers))
            done = engine.run(pieces, engine.open_connections(sess, count),
                              do_piece, retry)
            dst.commit()
        return engine.result("download", size, done, skipped, started, sess,
                             count)


def _dirty_extents(sess):
    """The transfer's dirty extents; a clear error when it has none."""
    try:
        yield from sess.walk_extents("dirty")
    except HTTPError as e:
        if e.status == 404:
            raise TransferError(
                "the transfer has no dirty extents (its ticket is not "
                "dirty, or its export has no bitmap): download it whole, "
                "without --incremental", 0) from e
        raise


class _RawDestination:
    """A raw file (written as NAME.part with its journal, renamed when
    complete) or a block device (written in place)."""

    sequential = False

    def __init__(self, path, size, resume_part=False):
        self.path = path
        self._part = _part_path(path)
        self._journal = None
        if self._part and resume_part and os.path.exists(self._part):
            self._journal = _resume.Journal.load(self._part, size)
            self._local = localfile.open_existing(self._part, size)
        else:
            self._local = localfile.open_destination(self._part or path, size)
            if self._part:
                self._journal = _resume.Journal.create(self._part, size)
        if self._journal:
            self._journal.attach(self._local.fd)
        self.zeroed = self._local.zeroed
        self.done = self._journal.done if self._journal else []

    def receive(self, con, state, end, report):
        def ack(n):
            state["offset"] += n
            report(n)
        offset = state["offset"]
        try:
            con.read_to_fd(self._local.fd, offset, end - offset, ack,
                           positional=self._local.kind != "other")
        finally:
            self._record(offset, state["offset"])

    def zero(self, offset, length):
        if self._local.kind == "file":
            localfile.punch_hole(self._local, offset, length)
        else:
            localfile.zero_range(self._local, offset, length)
        self._record(offset, offset + length)

    def _record(self, start, end):
        if self._journal:
            self._journal.record(start, end)

    def commit(self):
        if self._local.kind != "other":
            os.fsync(self._local.fd)
        if self._part:
            os.rename(self._part, self.path)
            self._part = None
            self._journal.remove()
            self._journal = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Interrupted or failed: what is on disk is recorded, and the
        # .part kept for a resume.
        try:
            if self._journal:
                self._journal.checkpoint()
        except OSError as e:
            log.warning("cannot record what %s holds: %s", self._part, e)
        finally:
            if self._journal:
                self._journal.close()
            self._local.close()


class _StreamDestination:
    """Standard output: a raw stream written in order, zeros included."""

    sequential = True
    zeroed = False
    done = []

    def __init__(self, size, fd=1):
        self._fd = fd
        self.size = size

    def receive(self, con, state, end, report):
        def ack(n):
            state["offset"] += n
            report(n)
        offset = state["offset"]
        con.read_to_fd(self._fd, offset, end - offset, ack, positional=False)

    def zero(self, offset, length):
        zeros = memoryview(bytes(min(length, localfile.ZERO_CHUNK)))
        while length:
            n = os.write(self._fd, zeros[:length])
            length -= n

    def commit(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _part_path(path):
    """Where a download into ``path`` is written until complete: NAME.part
    for a regular file (or a new one), None for a device or a pipe."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return os.fsdecode(path) + ".part"
    return os.fsdecode(path) + ".part" if stat.S_ISREG(st.st_mode) else None


