"""``diskferry bench``: transfer speed on this machine, next to its limits."""

import argparse
import json
import sys

from diskferry.cli import arguments
from diskferry.cli.arguments import Subparsers

EPILOG = """\
It starts a daemon of its own (a free port, a scratch state folder),
makes a fully allocated image, and times `diskferry download` and
`diskferry upload` of it over the UNIX socket and over TLS, each run as
a whole process. Before each run the image is read into the page cache;
uploads overwrite a target written in full beforehand, and downloads
write a new file into memory kept warm for them (on virtual machines
that give free memory back to the host, fresh pages would cost a host
fault each). Then it measures what the machine allows: reading the
image from the page cache, sendfile into a UNIX socket, Python's TLS in
memory, and a local `qemu-img convert`. GiB/s are per GiB of image;
CPU seconds per GiB are the client's (the command, start-up included)
and the daemon's apart.

On a 2-core machine client and daemon share the cores: compare the rows
of one run, and read the spread before a ratio.
"""


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure transfer speed on this machine",
        description="Measure download and upload speed on this machine "
                    "with a local daemon, next to the machine's limits.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", type=arguments.size(1024**2, 64 * 1024**3),
        default=2 * 1024**3, metavar="SIZE",
        help="image size, e.g. 512M or 4G (default 2G)")
    parser.add_argument(
        "--reps", type=arguments.integer(1, 20), default=3, metavar="N",
        help="runs of each case, interleaved (default 3)")
    parser.add_argument(
        "--dir", metavar="FOLDER",
        help="where the image is made (default: $TMPDIR or /tmp); "
             "destinations go to /dev/shm when it has room")
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object instead of the table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diskferry.benchmark import runner

    def progress(text: str) -> None:
        if not args.json:
            print(f"diskferry bench: {text}", file=sys.stderr)

    try:
        rows = runner.run(args.size, args.reps, args.dir, progress)
    except (OSError, RuntimeError) as e:
        print(f"diskferry bench: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"size": args.size, "reps": args.reps,
                          "rows": rows}))
        return 0
    print("| case | GiB/s median [min-max] | client CPU s/GiB "
          "| server CPU s/GiB |")
    print("|---|---|---|---|")
    for row in rows:
        server = row.get("server_cpu_s_per_gib")
        print(f"| {row['name']} | {row['gib_s']:.2f} "
              f"[{row['gib_s_min']:.2f}-{row['gib_s_max']:.2f}] | "
              f"{row['client_cpu_s_per_gib']:.2f} | "
              f"{'-' if server is None else f'{server:.2f}'} |")
    return 0
