"""What the client commands share: how to reach a transfer URL, and how
a failure is told.

``upload``, ``download``, ``info`` and ``map`` take the same connection
options, checked at the door (``arguments``), and report a failure as
one line on standard error, with a hint when the cause is a common
mistake (``hints``); never a traceback.
"""

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Iterable

from diskferry import client
from diskferry.cli import arguments, hints

#: Exit status of a refused argument, as argparse uses for usage errors.
EXIT_USAGE = 2
#: Exit status of a failed operation.
EXIT_FAILED = 1

#: Exit status when standard output's reader went away (``| head``):
#: a shell's status of a command that SIGPIPE ended, as ``seq`` ends.
EXIT_READER_GONE = 128 + signal.SIGPIPE

#: Longest error message printed: a server's answer may be a whole page.
MAX_MESSAGE = 500

#: An HTML page in an error answer, from its start to its end.
_HTML_PAGE = re.compile(r"\s*<(?:!DOCTYPE|html)\b.*", re.IGNORECASE | re.DOTALL)

#: Errors a command reports as one line; anything else is a bug.
REPORTED = (client.ClientError, OSError, ValueError)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cafile", metavar="FILE", type=arguments.ca_file,
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
    message = one_line(str(error) or type(error).__name__)
    hint = hints.for_error(url, error) if url else None
    if hint:
        message += f" ({hint})"
    print(f"diskferry {command}: error: {message}", file=sys.stderr)
    return status


def one_line(message: str) -> str:
    """``message`` on one line: an HTML page a server answered (a web
    server, not an image server) is not printed, and a long message is
    cut."""
    message = _HTML_PAGE.sub(" (an HTML page)", message)
    message = " ".join(message.split())
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    return message


def usage_error(command: str, message: str) -> int:
    print(f"diskferry {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


class ReaderGone(Exception):
    """Raised when standard output's reader went away (``| head``): not a
    failure of the command, which ends quietly."""


def print_lines(lines: Iterable[str]) -> None:
    """Print ``lines`` on standard output, then flush it. A broken pipe
    there is ReaderGone; one in producing ``lines`` (the network) stays
    an error."""
    for line in lines:
        try:
            print(line)
        except BrokenPipeError as e:
            raise ReaderGone from e
    try:
        sys.stdout.flush()
    except BrokenPipeError as e:
        raise ReaderGone from e


def reader_gone() -> int:
    """End quietly: nothing more goes to the closed standard output, not
    even the interpreter's last flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE
