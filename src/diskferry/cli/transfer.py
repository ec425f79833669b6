"""``diskferry upload`` and ``diskferry download``: whole disk images.

Output: a progress bar on a terminal, then a one-line summary. When
standard output is not a terminal (scripts, benchmarks), the summary is
one JSON object instead, with at least ``bytes`` and ``seconds``.
"""

import argparse
import json
import logging
import os
import re
import sys

from diskferry import client
from diskferry.client import imageformat
from diskferry.client.copy import DEFAULT_REQUEST_SIZE, DEFAULT_WORKERS

UPLOAD_EPILOG = """\
examples:
  diskferry upload --cafile ca.pem disk.qcow2 \\
      https://host.example.com:54322/images/0f6c7e4a-5b1e-4c8e-9d2f-3a1b2c3d4e5f
  diskferry upload --member disk1.vmdk appliance.ova URL
  diskferry upload --single-layer inc2.qcow2 URL

FILE is a disk image in any format qemu reads (raw, qcow2 with its
backing chain, vmdk, vdi, vhdx, qed, vpc, ...) or a block device holding
one. Its format is probed (qemu-img info, or its magic bytes without
qemu-img): raw is sent as it is; other formats are read through qemu-nbd
(package qemu-utils), so the guest's disk is uploaded, not the file. An
encrypted or compressed file, or an archive without --member, is refused
with exit status 2 before anything is sent. --format raw uploads FILE's
bytes as they are.

On the server's host the transfer switches to the server's UNIX socket by
itself (see --unix). Holes of the source are not sent.
"""

#: Exit status of a refused argument, as argparse uses for usage errors.
EXIT_USAGE = 2

DOWNLOAD_EPILOG = """\
examples:
  diskferry download --cafile ca.pem \\
      https://host.example.com:54322/images/0f6c7e4a-5b1e-4c8e-9d2f-3a1b2c3d4e5f \\
      disk.raw
  diskferry download --format qcow2 URL full.qcow2
  diskferry download --incremental --backing-file full.qcow2 URL inc1.qcow2

A raw FILE is written sparse (zero ranges are not transferred and stay
holes); a block device is written in place. A qcow2 FILE is created with
qemu-img and written through qemu-nbd, over --backing-file when given.
A file is written as FILE.part and renamed when complete; an existing
FILE is replaced only with --overwrite.

--incremental copies only what the transfer's dirty extents name (a
backup ticket with "dirty": true) into a qcow2 overlay of the previous
backup: full.qcow2 <- inc1.qcow2 <- inc2.qcow2 reads as the disk did at
each backup. Restore by uploading the newest overlay: its chain is read
with it.
"""

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size_arg(text):
    """Parse "8M", "8MiB", "4k" or "1048576" into bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.I)
    if not match or int(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}")
    return int(match[1]) * _UNITS[match[2].lower()]


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _add_common(parser):
    parser.add_argument(
        "--cafile", metavar="FILE",
        help="CA certificate to verify the server with (default: system CAs)")
    parser.add_argument(
        "--insecure", action="store_true",
        help="do not verify the server's certificate")
    parser.add_argument(
        "--workers", type=positive_int, default=DEFAULT_WORKERS, metavar="N",
        help="connections in parallel, at most what the server allows "
             f"(default {DEFAULT_WORKERS})")
    parser.add_argument(
        "--request-size", type=size_arg, default=DEFAULT_REQUEST_SIZE,
        metavar="SIZE",
        help="bytes per request, e.g. 4M (default "
             f"{DEFAULT_REQUEST_SIZE // 1024**2}M)")
    parser.add_argument(
        "--unix", choices=client.session.UNIX_MODES, default="auto",
        help="use the server's UNIX socket: auto (when the server is on "
             "this host), always (fail without it) or never")
    parser.add_argument(
        "--retries", type=int, default=client.Retry().total, metavar="N",
        help="times a request is resent after a broken connection "
             f"(default {client.Retry().total})")
    parser.add_argument(
        "--connect-timeout", type=float, default=client.Timeout().connect,
        metavar="SECONDS", help="seconds to wait for a connection")
    parser.add_argument(
        "--read-timeout", type=float, default=client.Timeout().read,
        metavar="SECONDS", help="seconds to wait for each socket operation")
    parser.add_argument(
        "--verify", action="store_true",
        help="compare the server's checksum of the image with the local "
             "one afterwards")
    parser.add_argument(
        "--no-detect-zeros", dest="detect_zeros", action="store_false",
        help="move zero blocks inside data as data (default: images read "
             "or written through qemu-nbd send runs of zeros as zero)")
    parser.add_argument(
        "--quiet", "-q", action="store_true",
        help="print nothing but errors")
    parser.add_argument(
        "--debug", action="store_true", help="log what the client decides")


def register(subparsers):
    up = subparsers.add_parser(
        "upload", help="upload a local disk image to a transfer URL",
        description="Upload a local disk image (raw, qcow2, vmdk, ... or a "
                    "block device) to a transfer URL "
                    "(https://HOST:PORT/images/TICKET).",
        epilog=UPLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("file", metavar="FILE", help="disk image or block device")
    up.add_argument("url", metavar="URL", help="transfer URL")
    up.add_argument(
        "--format", metavar="FORMAT",
        help="format of FILE, not probed: raw uploads its bytes as they are; "
             "qcow2, vmdk, ... read it through qemu-nbd (default: probe)")
    up.add_argument(
        "--member", metavar="NAME",
        help="upload member NAME of the tar archive (OVA) FILE, read in "
             "place")
    up.add_argument(
        "--single-layer", action="store_true",
        help="upload FILE's own layer, not its backing chain: what it does "
             "not allocate is left untouched in the destination")
    _add_common(up)
    up.set_defaults(func=run_upload)

    down = subparsers.add_parser(
        "download", help="download a transfer URL to a local disk image",
        description="Download a transfer URL (https://HOST:PORT/images/"
                    "TICKET) to a raw or qcow2 image, or a block device.",
        epilog=DOWNLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    down.add_argument("url", metavar="URL", help="transfer URL")
    down.add_argument("file", metavar="FILE",
                      help="image file to create, or block device")
    down.add_argument(
        "--format", choices=("raw", "qcow2"), default=None,
        help="format of FILE (default: raw; qcow2 with --backing-file)")
    down.add_argument(
        "--backing-file", metavar="PATH",
        help="create FILE as a qcow2 overlay of PATH (named relative to "
             "FILE)")
    down.add_argument(
        "--incremental", action="store_true",
        help="copy only the transfer's dirty extents (needs "
             "--backing-file: the previous backup)")
    down.add_argument(
        "--overwrite", action="store_true",
        help="replace FILE if it exists")
    _add_common(down)
    down.set_defaults(func=run_download)


def run_upload(args):
    if args.verify and args.single_layer:
        print("diskferry upload: error: --verify compares whole disks; a "
              "single layer is not one", file=sys.stderr)
        return EXIT_USAGE
    return _run(args, "upload", client.upload, args.file, args.url,
                format=args.format, member=args.member,
                single_layer=args.single_layer,
                detect_zeros=args.detect_zeros)


def run_download(args):
    fmt = args.format or ("qcow2" if args.backing_file else "raw")
    problem = _download_problem(args, fmt)
    if problem:
        print(f"diskferry download: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return _run(args, "download", client.download, args.url, args.file,
                format=fmt, backing_file=args.backing_file,
                incremental=args.incremental, detect_zeros=args.detect_zeros)


def _download_problem(args, fmt):
    """Why the download's arguments cannot work, or None."""
    if args.incremental and not args.backing_file:
        return ("--incremental needs --backing-file (the previous backup "
                "the new overlay reads through)")
    if args.backing_file and fmt == "raw":
        return "--backing-file needs --format qcow2: a raw image has none"
    if args.backing_file and not os.path.exists(args.backing_file):
        return f"--backing-file {args.backing_file}: no such file"
    if (os.path.isfile(args.file) or os.path.islink(args.file)) and \
            not args.overwrite:
        return (f"{args.file} exists; pass --overwrite to replace it")
    return None


def _run(args, command, copy, src, dst, **options):
    _setup_logging(args)
    bar = None if args.quiet or not sys.stderr.isatty() else ProgressBar(command)
    try:
        result = copy(
            src, dst, workers=args.workers, request_size=args.request_size,
            cafile=args.cafile, secure=not args.insecure, unix=args.unix,
            timeout=client.Timeout(args.connect_timeout, args.read_timeout),
            retry=client.Retry(total=max(0, args.retries)),
            progress=bar.update if bar is not None else None,
            on_start=bar.start if bar is not None else None, **options)
    except client.UnsupportedFormat as e:
        if bar is not None:
            bar.close()
        message = (imageformat.refusal(e.path, e.probe, "--format raw")
                   if isinstance(e.probe, imageformat.Probe) else str(e))
        print(f"diskferry {command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except (client.ClientError, OSError, ValueError) as e:
        if bar is not None:
            bar.close()
        print(f"diskferry {command}: error: {e}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    verified = None
    if args.verify:
        try:
            verified = _verify(args, command)
        except (client.ClientError, OSError, ValueError) as e:
            print(f"diskferry {command}: verify failed: {e}", file=sys.stderr)
            return 1
    _summary(args, result, verified)
    return 0


def _setup_logging(args):
    level = logging.DEBUG if args.debug else (
        logging.ERROR if args.quiet else logging.WARNING)
    logging.basicConfig(level=level, format="diskferry: %(message)s")


class ProgressBar:
    """A tqdm bar shown once the image size is known (throughput, ETA)."""

    def __init__(self, command):
        self._command = command
        self._bar = None

    def start(self, size):
        from tqdm import tqdm

        self._bar = tqdm(desc=self._command, total=size, unit="B",
                         unit_scale=True, unit_divisor=1024,
                         dynamic_ncols=True, file=sys.stderr)

    def update(self, n):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def _verify(args, command):
    """Compare the server's checksum with the local image's; raise on a
    mismatch."""
    with client.open(args.url, "r", cafile=args.cafile,
                     secure=not args.insecure, unix=args.unix) as sess:
        remote = sess.checksum()
    fmt, member = _local_format(args, command)
    if fmt == imageformat.RAW and member is None:
        from diskferry import checksum

        local = checksum.compute_file(args.file, remote["algorithm"],
                                      remote["block_size"])
    else:
        from diskferry.client import imagecopy

        local = imagecopy.checksum(args.file, fmt, member=member,
                                   algorithm=remote["algorithm"],
                                   block_size=remote["block_size"])
    if local["checksum"] != remote["checksum"]:
        raise client.ClientError(
            f"checksums differ: server {remote['checksum']}, "
            f"local {local['checksum']} ({remote['algorithm']}, "
            f"block size {remote['block_size']})")
    return remote


def _local_format(args, command):
    """(format, member) the local image is read in, as the copy read it."""
    if command == "download":
        return args.format or ("qcow2" if args.backing_file else "raw"), None
    fd = os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return imageformat.source_format(args.file, fd, size, args.format,
                                         member=args.member), args.member
    finally:
        os.close(fd)


def _summary(args, result, verified):
    if sys.stdout.isatty():
        if args.quiet:
            return
        line = (f"{result.direction}ed {_human(result.image_size)} "
                f"({_human(result.data_bytes)} data) in {result.seconds:.2f} s, "
                f"{result.gib_per_second:.2f} GiB/s via {result.transport} "
                f"({result.connections} connection"
                f"{'s' if result.connections > 1 else ''})")
        if result.transport != "unix":
            line += f"; {result.transport_reason}"
        if verified:
            line += ", checksum verified"
        print(line)
        return
    print(json.dumps({
        "op": result.direction,
        "bytes": result.data_bytes,
        "image_bytes": result.image_size,
        "zero_bytes": result.zero_bytes,
        "skipped_bytes": result.skipped_bytes,
        "seconds": round(result.seconds, 6),
        "gib_s": round(result.gib_per_second, 3),
        "transport": result.transport,
        "transport_reason": result.transport_reason,
        "connections": result.connections,
        "verified": bool(verified),
    }))


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
