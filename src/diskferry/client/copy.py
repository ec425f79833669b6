"""Whole images between a local file and a transfer URL.

``upload`` and ``download`` are the library's front door. A raw file or
block device is copied here, the kernel moving the bytes (``sendfile``
on upload, ``splice`` on download); any other format, an archive member,
or a download into qcow2 goes through qemu-nbd (``imagecopy``). Both run
on the same engine (``engine``): planned pieces, parallel connections,
retries from the last acknowledged byte.
"""

import logging
import os
import stat
import time

from diskferry.client import engine, imageformat, localfile, session
from diskferry.client import extents as _extents
from diskferry.client.engine import (
    DEFAULT_REQUEST_SIZE,
    DEFAULT_WORKERS,
    TransferResult,
)
from diskferry.client.errors import HTTPError, TransferError
from diskferry.client.policy import Retry, Timeout
from diskferry.extent import Extent

__all__ = ["DEFAULT_REQUEST_SIZE", "DEFAULT_WORKERS", "TransferResult",
           "download", "upload"]

log = logging.getLogger("diskferry.client")


def upload(path, url, *, workers=DEFAULT_WORKERS,
           request_size=DEFAULT_REQUEST_SIZE, cafile=None, secure=True,
           unix="auto", timeout=Timeout(), retry=Retry(), progress=None,
           on_start=None, format=None, member=None, single_layer=False,
           detect_zeros=True):
    """Upload the disk image at ``path`` to transfer ``url``.

    ``format`` None probes the source first (``imageformat``): raw is sent
    as it is, a format qemu reads (qcow2 with its backing chain, vmdk,
    vdi, vhdx, ...) is read through qemu-nbd, and anything else raises
    ``UnsupportedFormat`` before any request. ``format="raw"`` uploads
    the bytes as they are; another format names the qemu driver.
    ``member`` names a disk inside a tar archive (an OVA), read in place.
    ``single_layer`` uploads the top layer of a chain alone: what it
    leaves unallocated is left untouched in the destination.

    Holes of the source are zeroed with PATCH zero, except where the
    destination already reads zeros (its extents say so). With
    ``detect_zeros``, zero runs inside data read through qemu-nbd are
    sent as zero too. ``progress(n)`` is called as ``n`` more bytes of
    the image are done, ``on_start(size)`` once the image size is known.
    """
    started = time.monotonic()
    report = engine.Progress(progress)
    local = localfile.open_source(path)
    try:
        fmt = imageformat.source_format(os.fsdecode(path), local.fd,
                                        local.size, format, member=member)
        log.debug("%s: read as %s", path, fmt)
        if fmt == imageformat.RAW and member is None:
            source = _RawSource(local)
        else:
            from diskferry.client import imagecopy

            source = imagecopy.NbdSource(
                os.fsdecode(path), fmt, member=member,
                single_layer=single_layer, connections=workers,
                request_size=request_size, detect_zeros=detect_zeros)
        with source, session.open(url, "w", cafile=cafile, secure=secure,
                                  unix=unix, timeout=timeout,
                                  buffer_size=request_size) as sess:
            size = sess.size()
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

            count = max(1, min(workers, sess.max_writers))
            engine.run(pieces, engine.open_connections(sess, count),
                       do_piece, retry, prefetch=source.prefetch)
            if not flush_each:
                engine.flush(sess, retry)
            return engine.result("upload", size, sender.done,
                                 skipped + sender.done["skipped"], started,
                                 sess, count)
    finally:
        local.close()


class _RawSource:
    """A raw file or block device: mapped with SEEK_DATA, sent by the
    kernel (sendfile or splice)."""

    keeps_holes = False
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def download(url, path, *, workers=DEFAULT_WORKERS,
             request_size=DEFAULT_REQUEST_SIZE, cafile=None, secure=True,
             unix="auto", timeout=Timeout(), retry=Retry(), progress=None,
             on_start=None, format="raw", backing_file=None,
             incremental=False, detect_zeros=True):
    """Download transfer ``url`` into a local image at ``path``.

    ``format="raw"``: a regular file is written as ``PATH.part``, sparse
    (zero ranges are not transferred and stay holes), and renamed to
    ``path`` once every byte is written and synced; a block device is
    written in place, its zero ranges zeroed locally.

    ``format="qcow2"`` creates a qcow2 image (over ``backing_file`` when
    given, named relative to it) and writes it through qemu-nbd; zero
    ranges are written only where they must hide backing data.
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
        if format == imageformat.RAW:
            dst = _RawDestination(path, size)
        else:
            from diskferry.client import imagecopy

            dst = imagecopy.NbdDestination(
                os.fsdecode(path), format, size, backing_file=backing_file,
                connections=workers, request_size=request_size,
                detect_zeros=detect_zeros)
        with dst:
            if on_start:
                on_start(size)
            skipped = 0

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

            count = max(1, min(workers, sess.max_readers))
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
    """A raw file (written as NAME.part, renamed when complete) or a
    block device (written in place)."""

    def __init__(self, path, size):
        self.path = path
        self._part = _part_path(path)
        self._local = localfile.open_destination(self._part or path, size)
        self.zeroed = self._local.zeroed

    def receive(self, con, state, end, report):
        def ack(n):
            state["offset"] += n
            report(n)
        offset = state["offset"]
        con.read_to_fd(self._local.fd, offset, end - offset, ack,
                       positional=self._local.kind != "other")

    def zero(self, offset, length):
        localfile.zero_range(self._local, offset, length)

    def commit(self):
        if self._local.kind != "other":
            os.fsync(self._local.fd)
        if self._part:
            os.rename(self._part, self.path)
            self._part = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._local.close()
        if self._part:
            _remove(self._part)


def _part_path(path):
    """Where a download into ``path`` is written until complete: NAME.part
    for a regular file (or a new one), None for a device or a pipe."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return os.fsdecode(path) + ".part"
    return os.fsdecode(path) + ".part" if stat.S_ISREG(st.st_mode) else None


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
