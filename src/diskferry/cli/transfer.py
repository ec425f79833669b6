"""``diskferry upload`` and ``diskferry download``: whole disk images.

Output: a progress bar on standard error when it is a terminal (the
copy, then a "verifying" phase with --verify), then the summary
(``output``): a human line by default, one JSON line with --json,
nothing with --quiet. ``-`` names standard input or output, a raw
stream; the summary then goes to standard error, with the data's way
left clean.
"""

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeAlias

from diskferry import client
from diskferry.cli import arguments, common, output
from diskferry.cli.progress import ProgressBar
from diskferry.cli.units import KiB, MiB
from diskferry.client import imageformat, localfile
from diskferry.client.copy import DEFAULT_REQUEST_SIZE, DEFAULT_WORKERS, STREAM
from diskferry.client.engine import TransferResult
from diskferry.client.resume import ResumeError
from diskferry.client.rules import Rule, download_conflict, upload_conflict

#: The subcommands' registry, as argparse types it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

UPLOAD_EPILOG = """\
examples:
  diskferry upload --cafile ca.pem disk.qcow2 \\
      https://host.example.com:54322/images/0f6c7e4a-5b1e-4c8e-9d2f-3a1b2c3d4e5f
  diskferry upload --member disk1.vmdk appliance.ova URL
  diskferry upload --single-layer inc2.qcow2 URL

FILE "-" reads a raw stream from standard input: --size bytes, or the
image's size.

FILE is a disk image in any format qemu reads (raw, qcow2 with its
backing chain, vmdk, vdi, vhdx, qed, vpc, ...) or a block device holding
one. Its format is probed (qemu-img info, or its magic bytes without
qemu-img): raw is sent as it is; a qcow2 chain from where its data lies
in its files (qemu-img map); other formats, and compressed qcow2, are
read through qemu-nbd (package qemu-utils). Either way the guest's disk
is uploaded, not the file. An
encrypted or compressed file, or an archive without --member, is refused
with exit status 2 before anything is sent. --format raw uploads FILE's
bytes as they are.

On the server's host the transfer switches to the server's UNIX socket by
itself (see --unix). Holes of the source are not sent.
"""

DOWNLOAD_EPILOG = """\
examples:
  diskferry download --cafile ca.pem \\
      https://host.example.com:54322/images/0f6c7e4a-5b1e-4c8e-9d2f-3a1b2c3d4e5f \\
      disk.raw
  diskferry download --format qcow2 URL full.qcow2
  diskferry download --incremental --backing-file full.qcow2 URL inc1.qcow2

A raw FILE is written sparse (zero ranges are not transferred and stay
holes); a block device is written in place. A new qcow2 FILE is written by
the client itself; over --backing-file, it is created with qemu-img and
written through qemu-nbd.
A file is written as FILE.part and renamed when complete; an existing
FILE is replaced only with --overwrite. An interrupted download keeps
FILE.part and its journal FILE.part.done: --resume continues it. FILE
"-" writes a raw stream to standard output.

--incremental copies only what the transfer's dirty extents name (a
backup ticket with "dirty": true) into a qcow2 overlay of the previous
backup: full.qcow2 <- inc1.qcow2 <- inc2.qcow2 reads as the disk did at
each backup. Restore by uploading the newest overlay: its chain is read
with it.
"""

#: Bounds of --request-size: below 4 KiB a copy is all request
#: overhead; above 64 MiB one request holds that much memory per worker.
MIN_REQUEST_SIZE = 4 * KiB
MAX_REQUEST_SIZE = 64 * MiB
MAX_WORKERS = 64

#: The library's option rules (``client.rules``), in this command's words.
UPLOAD_RULES = {
    Rule.VERIFY_SINGLE_LAYER:
        "--verify compares whole disks; a single layer is not one",
    Rule.STREAM_UPLOAD_FORMAT:
        "standard input (-) is a raw stream: --format other than raw and "
        "--member cannot apply",
    Rule.STREAM_REREAD:
        "--verify reads the image again: not from standard input",
    Rule.SIZE_WITHOUT_STREAM:
        "--size is for standard input (FILE -); a file has its own",
}
DOWNLOAD_RULES = {
    Rule.INCREMENTAL_WITHOUT_BACKING:
        "--incremental needs --backing-file (the previous backup the new "
        "overlay reads through)",
    Rule.BACKING_RAW:
        "--backing-file needs --format qcow2: a raw image has none",
    Rule.RESUME_NOT_RAW:
        "--resume continues raw downloads only (a qcow2 is rebuilt)",
    Rule.STREAM_DOWNLOAD_FORMAT:
        "standard output (-) is a raw stream: --format other than raw "
        "cannot apply",
    Rule.STREAM_REREAD:
        "--verify and --resume read the image again: not on standard "
        "output",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    common.add_connection_options(parser)
    parser.add_argument(
        "--workers", type=arguments.integer(1, MAX_WORKERS),
        default=DEFAULT_WORKERS, metavar="N",
        help=f"connections in parallel, 1 to {MAX_WORKERS}, at most what "
             f"the server allows (default {DEFAULT_WORKERS})")
    parser.add_argument(
        "--request-size",
        type=arguments.size(MIN_REQUEST_SIZE, MAX_REQUEST_SIZE),
        default=DEFAULT_REQUEST_SIZE, metavar="SIZE",
        help="bytes per request, 4K to 64M, e.g. 4M (default "
             f"{DEFAULT_REQUEST_SIZE // MiB}M)")
    parser.add_argument(
        "--retries", type=arguments.integer(0), default=client.Retry().total,
        metavar="N",
        help="times a request is resent after a broken connection, 0 or "
             f"more (default {client.Retry().total})")
    parser.add_argument(
        "--verify", action="store_true",
        help="compare the server's checksum of the image with the local "
             "one afterwards")
    parser.add_argument(
        "--no-detect-zeros", dest="detect_zeros", action="store_false",
        help="move zero blocks inside data as data (default: runs of "
             "zeros inside the data of an image that is not raw are sent "
             "as zero)")
    output.add_output_options(parser)


def register(subparsers: Subparsers) -> None:
    _register_upload(subparsers)
    _register_download(subparsers)


def _register_upload(subparsers: Subparsers) -> None:
    up = subparsers.add_parser(
        "upload", help="upload a local disk image to a transfer URL",
        description="Upload a local disk image (raw, qcow2, vmdk, ... or a "
                    "block device) to a transfer URL "
                    "(https://HOST:PORT/images/TICKET).",
        epilog=UPLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("file", metavar="FILE",
                    help="disk image or block device; - for standard input")
    up.add_argument("url", metavar="URL", help="transfer URL")
    up.add_argument(
        "--format", metavar="FORMAT",
        help="format of FILE, not probed: raw uploads its bytes as they are; "
             "qcow2, vmdk, ... read the guest's disk (default: probe)")
    up.add_argument(
        "--member", metavar="NAME",
        help="upload member NAME of the tar archive (OVA) FILE, read in "
             "place")
    up.add_argument(
        "--single-layer", action="store_true",
        help="upload FILE's own layer, not its backing chain: what it does "
             "not allocate is left untouched in the destination")
    up.add_argument(
        "--size", type=arguments.any_size, metavar="SIZE",
        help="bytes to read from standard input (FILE -), e.g. 10G "
             "(default: the image's size)")
    _add_common(up)
    up.set_defaults(func=run_upload)


def _register_download(subparsers: Subparsers) -> None:
    down = subparsers.add_parser(
        "download", help="download a transfer URL to a local disk image",
        description="Download a transfer URL (https://HOST:PORT/images/"
                    "TICKET) to a raw or qcow2 image, or a block device.",
        epilog=DOWNLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    down.add_argument("url", metavar="URL", help="transfer URL")
    down.add_argument("file", metavar="FILE",
                      help="image file to create, or block device; - for "
                           "standard output")
    down.add_argument(
        "--format", choices=("raw", "qcow2"), default=None,
        help="format of FILE (default: raw; qcow2 with --backing-file)")
    down.add_argument(
        "--backing-file", metavar="PATH",
        help="create FILE as a qcow2 overlay of PATH; a relative PATH is "
             "relative to FILE's folder, as qemu-img names a backing file "
             "(FILE's header keeps it so)")
    down.add_argument(
        "--incremental", action="store_true",
        help="copy only the transfer's dirty extents (needs "
             "--backing-file: the previous backup)")
    down.add_argument(
        "--overwrite", action="store_true",
        help="replace FILE if it exists")
    down.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted raw download from FILE.part and its "
             "journal (what was written and synced)")
    _add_common(down)
    down.set_defaults(func=run_download)


def run_upload(args: argparse.Namespace) -> int:
    problem = _upload_problem(args)
    if problem:
        return common.usage_error("upload", problem)
    return _run(args, "upload", client.upload, args.file, args.url,
                format=args.format, member=args.member,
                single_layer=args.single_layer,
                detect_zeros=args.detect_zeros, size=args.size)


def _upload_problem(args: argparse.Namespace) -> str | None:
    """Why the upload's arguments cannot work, or None."""
    rule = upload_conflict(args.file, format=args.format, member=args.member,
                           single_layer=args.single_layer, size=args.size,
                           verify=args.verify)
    if rule is not None:
        return UPLOAD_RULES.get(rule, rule.value)
    if args.file != STREAM and not os.path.exists(args.file):
        return f"{args.file}: no such file"
    return None


def run_download(args: argparse.Namespace) -> int:
    fmt = args.format or ("qcow2" if args.backing_file else "raw")
    problem = _download_problem(args, fmt)
    if problem:
        return common.usage_error("download", problem)
    return _run(args, "download", client.download, args.url, args.file,
                format=fmt, backing_file=args.backing_file,
                incremental=args.incremental, detect_zeros=args.detect_zeros,
                resume=args.resume)


def _download_problem(args: argparse.Namespace, fmt: str) -> str | None:
    """Why the download's arguments cannot work, or None."""
    rule = download_conflict(args.file, format=fmt,
                             backing_file=args.backing_file,
                             incremental=args.incremental,
                             resume=args.resume, verify=args.verify)
    if rule is not None:
        return DOWNLOAD_RULES.get(rule, rule.value)
    if args.backing_file:
        backing = localfile.backing_path(args.file, args.backing_file)
        if not os.path.exists(backing):
            where = "" if backing == args.backing_file else (
                f" ({backing}: a relative name is relative to FILE's "
                f"folder)")
            return f"--backing-file {args.backing_file}: no such file{where}"
    if args.file == STREAM:
        if sys.stdout.isatty():
            return "standard output is a terminal: redirect it to a file " \
                   "or a pipe"
        return None
    folder = os.path.dirname(os.path.abspath(args.file))
    if not os.path.isdir(folder):
        return f"{folder}: no such folder (for {args.file})"
    if (os.path.isfile(args.file) or os.path.islink(args.file)) and \
            not args.overwrite:
        return (f"{args.file} exists; pass --overwrite to replace it")
    return None


#: ``client.upload`` or ``client.download``.
Copy = Callable[..., TransferResult]


def _run(args: argparse.Namespace, command: str, copy: Copy, src: str,
         dst: str, **options: object) -> int:
    common.setup_logging(args, quiet=args.output == output.QUIET)
    show = args.output != output.QUIET and sys.stderr.isatty()
    result = _copy(args, command, copy, src, dst, show, options)
    if not isinstance(result, TransferResult):
        return result
    verify_seconds = None
    if args.verify:
        started = time.monotonic()
        bar = ProgressBar("verifying") if show else None
        try:
            _verify(args, command, result.image_size, bar)
        except common.REPORTED as e:
            print(f"diskferry {command}: verify failed: {e}", file=sys.stderr)
            return common.EXIT_FAILED
        finally:
            if bar is not None:
                bar.close()
        verify_seconds = time.monotonic() - started
    data_out = command == "download" and args.file == STREAM
    output.print_summary(args.output, result, verify_seconds,
                         verified=args.verify,
                         stream=sys.stderr if data_out else sys.stdout)
    return 0


def _copy(args: argparse.Namespace, command: str, copy: Copy, src: str,
          dst: str, show: bool,
          options: dict[str, object]) -> TransferResult | int:
    """The copy with its progress bar: its result, or the exit status of
    its failure, reported."""
    bar = ProgressBar(command) if show else None
    try:
        return copy(
            src, dst, workers=args.workers, request_size=args.request_size,
            retry=client.Retry(total=args.retries),
            progress=bar.update if bar is not None else None,
            on_start=bar.start if bar is not None else None,
            **common.connection_kwargs(args), **options)
    except client.UnsupportedFormat as e:
        message = (imageformat.refusal(e.path, e.probe, "--format raw")
                   if isinstance(e.probe, imageformat.Probe) else str(e))
        return common.usage_error(command, message)
    except client.OutputClosed:
        # A reader that went away (| head) is not a failure of the copy.
        return common.reader_gone()
    except common.REPORTED as e:
        status = common.fail(command, e, args.url)
        if not isinstance(e, ResumeError):
            _resume_hint(args, command)
        return status
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        _resume_hint(args, command)
        raise
    finally:
        if bar is not None:
            bar.close()


def _resume_hint(args: argparse.Namespace, command: str) -> None:
    part = f"{args.file}.part"
    if command == "download" and args.file != STREAM and \
            os.path.exists(part) and os.path.exists(part + ".done"):
        print(f"diskferry download: {part} keeps what was written; run the "
              f"same command with --resume to continue", file=sys.stderr)


def _verify(args: argparse.Namespace, command: str, size: int,
            bar: ProgressBar | None) -> dict[str, Any]:
    """Compare the server's checksum with the local image's, computed at
    the same time; raise on a mismatch."""
    with client.open(args.url, "r", cafile=args.cafile,
                     secure=not args.insecure, unix=args.unix) as sess:
        remote: dict[str, Any] = {}
        failed: list[BaseException] = []

        def server_checksum() -> None:
            try:
                remote.update(sess.checksum())
            except BaseException as e:
                failed.append(e)

        # The server reads its copy while this side reads the local one.
        server = threading.Thread(target=server_checksum,
                                  name="diskferry-verify", daemon=True)
        server.start()
        if bar is not None:
            bar.start(size)
        fmt, member = _local_format(args, command)
        try:
            local = _local_checksum(args.file, fmt, member,
                                    bar.update if bar is not None else None)
        finally:
            server.join()
    if failed:
        raise failed[0]
    if local["algorithm"] != remote["algorithm"] or \
            local["block_size"] != remote["block_size"]:
        local = _local_checksum(args.file, fmt, member, None,
                                remote["algorithm"], remote["block_size"])
    if local["checksum"] != remote["checksum"]:
        raise client.ClientError(
            f"checksums differ: server {remote['checksum']}, "
            f"local {local['checksum']} ({remote['algorithm']}, "
            f"block size {remote['block_size']})")
    return remote


def _local_format(args: argparse.Namespace,
                  command: str) -> tuple[str, str | None]:
    """(format, member) the local image is read in, as the copy read it."""
    if command == "download":
        return args.format or ("qcow2" if args.backing_file else "raw"), None
    return imageformat.path_format(args.file, args.format,
                                   args.member), args.member


def _local_checksum(path: str, fmt: str, member: str | None,
                    progress: Callable[[int], None] | None,
                    algorithm: str | None = None,
                    block_size: int | None = None) -> dict[str, object]:
    from diskferry.client import imagecopy

    return imagecopy.local_checksum(path, fmt, member=member,
                                    progress=progress, algorithm=algorithm,
                                    block_size=block_size)
