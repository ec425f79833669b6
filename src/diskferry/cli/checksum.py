"""``diskferry checksum FILE``: the digest the server's /checksum gives.

The same block-based scheme (``diskferry.checksum``), so that a local
image and a transfer can be compared by eye or by script: equal digests
with the same algorithm and block size mean equal disks. A file in a
format qemu reads (qcow2, vmdk, ...) is hashed as the guest sees it,
through qemu-nbd, as an upload would send it; --format raw hashes the
file's bytes.
"""

import argparse
import json
import sys

from diskferry import checksum, client
from diskferry.cli import arguments, common, output
from diskferry.cli.arguments import Subparsers
from diskferry.cli.progress import ProgressBar
from diskferry.client import imageformat

EPILOG = """\
examples:
  diskferry checksum disk.raw
  diskferry checksum --json --algorithm sha256 --block-size 8M disk.qcow2

Compare with the server's: curl https://HOST:PORT/images/TICKET/checksum
(the same algorithm and block size give the same digest for the same
disk).
"""


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "checksum", help="checksum a local image as the server's /checksum "
                         "does",
        description="Print the block-based checksum of a local disk image, "
                    "the digest GET /images/TICKET/checksum answers for the "
                    "same disk.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", metavar="FILE", type=arguments.readable_file,
                        help="disk image or block device")
    parser.add_argument(
        "--algorithm", choices=checksum.ALGORITHMS,
        default=checksum.DEFAULT_ALGORITHM, metavar="NAME",
        help=f"hash algorithm (default {checksum.DEFAULT_ALGORITHM}; one of "
             f"{', '.join(checksum.ALGORITHMS)})")
    parser.add_argument(
        "--block-size", metavar="SIZE",
        type=arguments.size(checksum.MIN_BLOCK_SIZE, checksum.MAX_BLOCK_SIZE),
        default=checksum.DEFAULT_BLOCK_SIZE,
        help="block size, 1M to 16M, a multiple of 4K (default 4M)")
    parser.add_argument(
        "--format", metavar="FORMAT",
        help="format of FILE, not probed (raw hashes its bytes)")
    parser.add_argument("--json", dest="output", action="store_const",
                        const=output.JSON, default=output.HUMAN,
                        help="print the server's JSON answer format")
    parser.add_argument("--debug", action="store_true",
                        help="log what the client decides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.setup_logging(args)
    if args.block_size % checksum.BLOCK_SIZE_ALIGNMENT:
        return common.usage_error(
            "checksum", f"--block-size {args.block_size}: not a multiple of "
                        f"{checksum.BLOCK_SIZE_ALIGNMENT}")
    bar = ProgressBar("checksum") if sys.stderr.isatty() else None
    try:
        fmt = imageformat.path_format(args.file, args.format)
        from diskferry.client import imagecopy

        result = imagecopy.local_checksum(
            args.file, fmt, progress=bar.update if bar is not None else None,
            started=bar.start if bar is not None else None,
            algorithm=args.algorithm, block_size=args.block_size)
    except client.UnsupportedFormat as e:
        return common.fail("checksum", e, status=common.EXIT_USAGE)
    except common.REPORTED as e:
        return common.fail("checksum", e)
    finally:
        if bar is not None:
            bar.close()
    if args.output == output.JSON:
        print(json.dumps(result))
    else:
        print(f"{result['checksum']}  {args.file} ({result['algorithm']}, "
              f"block size {result['block_size']})")
    return 0

