"""What the client commands share: how to reach a transfer URL, and how
a failure is told.

``upload``, ``download``, ``info`` and ``map`` take the same connection
options, checked at the door (``arguments``), and report a failure as
one line on standard error, with a hint when the cause is a common
mistake (``hints``); never a traceback.
"""

import argparse
import logging
import sys

from diskferry import client
from diskferry.cli import arguments, hints

#: Exit status of a refused argument, as argparse uses for usage errors.
EXIT_USAGE = 2
#: Exit status of a failed operation.
EXIT_FAILED = 1

#: Errors a command reports as one line; anything else is a bug.
REPORTED = (client.ClientError, OSError, ValueError)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cafile", metavar="FILE", type=arguments.readable_file,
        help="CA certificate to verify the server with (default: system CAs)")
    parser.add_argument(
        "--insecure", action="store_true",
        help="do not verify the server's certificate")
    parser.add_argument(
        "--unix", choices=client.session.UNIX_MODES, default="auto",
        help="use the server's UNIX socket: auto (when the server is on "
             "this host), always (fail without it) or never")
    parser.add_argument(
        "--connect-timeout", type=arguments.seconds,
        default=client.Timeout().connect, metavar="SECONDS",
        help="seconds to wait for a connection (more than 0)")
    parser.add_argument(
        "--read-timeout", type=arguments.seconds,
        default=client.Timeout().read, metavar="SECONDS",
        help="seconds to wait for each socket operation (more than 0)")
    parser.add_argument(
        "--debug", action="store_true", help="log what the client decides")


def connection_kwargs(args: argparse.Namespace) -> client.ConnectionOptions:
    """The keyword arguments of ``client.open``/``upload``/``download``
    that the connection options give."""
    return {"cafile": args.cafile, "secure": not args.insecure,
            "unix": args.unix,
            "timeout": client.Timeout(args.connect_timeout,
                                      args.read_timeout)}


def setup_logging(args: argparse.Namespace, quiet: bool = False) -> None:
    level = logging.DEBUG if args.debug else (
        logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="diskferry: %(message)s")


def fail(command: str, error: BaseException, url: str | None = None,
         status: int = EXIT_FAILED) -> int:
    """Print ``error`` as one line (with a hint when one applies)."""
    message = str(error) or type(error).__name__
    hint = hints.for_error(url, error) if url else None
    if hint:
        message += f" ({hint})"
    print(f"diskferry {command}: error: {message}", file=sys.stderr)
    return status


def usage_error(command: str, message: str) -> int:
    print(f"diskferry {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
