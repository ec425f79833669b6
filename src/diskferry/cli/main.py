"""Entry point of the ``diskferry`` command.

Each module listed in ``COMMAND_MODULES`` adds its subcommands through a
``register(subparsers)`` function; a subcommand sets ``func(args) -> int``.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

from diskferry import __version__

COMMAND_MODULES = (
    "diskferry.cli.serve",
    "diskferry.cli.ticket",
    "diskferry.cli.backup",
    "diskferry.cli.transfer",
    "diskferry.cli.checksum",
    "diskferry.cli.inspect",
    "diskferry.cli.bench",
)

DESCRIPTION = """\
Move virtual disk images in and out of a host over HTTP.

  diskferry serve                      run the daemon (default configuration)
  diskferry ticket add FILE            authorize access to an image (prints its id)
  diskferry ticket list                the daemon's tickets
  diskferry backup start DOMAIN        back up a running libvirt domain
  diskferry upload FILE URL            upload a local image to a transfer URL
  diskferry download URL FILE          download a transfer URL to a local file
  diskferry info URL                   what a transfer URL offers, how it is reached
  diskferry map URL                    the extents of a transfer URL's image
  diskferry checksum FILE              a local image's checksum, as the server's
  diskferry bench                      measure transfer speed on this machine

Run 'diskferry COMMAND --help' for the options of a command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diskferry",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
