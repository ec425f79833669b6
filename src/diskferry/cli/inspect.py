"""``diskferry info URL`` and ``diskferry map URL``: a transfer seen
before copying it, as ``qemu-img info``/``nbdinfo`` and ``qemu-img
map``/``nbdinfo --map`` show a local image.

``info`` opens the URL as a copy would: what OPTIONS answered, the
image's size, and which transport a copy would use and why (the UNIX
socket when the server is on this host). ``map`` lists the image's
extents (``zero`` context: data, zero, hole; ``dirty``: what changed
since the backup's checkpoint).
"""

import argparse
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from diskferry import client
from diskferry.cli import common, output, units
from diskferry.cli.arguments import Subparsers
from diskferry.extent import Extent
from diskferry.sockaddr import display_address

INFO_EPILOG = """\
examples:
  diskferry info --cafile ca.pem https://host:54322/images/TICKET
  diskferry info --json --unix never URL
"""

MAP_EPILOG = """\
examples:
  diskferry map --cafile ca.pem https://host:54322/images/TICKET
  diskferry map --json --context dirty URL

Each line is an extent: its start, its length and what it holds (data,
zero, or hole: zeros no layer allocates). With --context dirty, whether
it changed since the backup's checkpoint. Adjacent extents alike are one
line. A reader that goes away (| head) ends the command quietly, with
status 141, as a command that SIGPIPE ends.
"""


def register(subparsers: Subparsers) -> None:
    info = subparsers.add_parser(
        "info", help="show what a transfer URL offers and how it would be "
                     "reached",
        description="Show a transfer URL's OPTIONS answer, the image's size, "
                    "and the transport a copy would use, with the reason.",
        epilog=INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("url", metavar="URL", help="transfer URL")
    _add_options(info)
    info.set_defaults(func=run_info)

    extents = subparsers.add_parser(
        "map", help="list the extents of a transfer URL",
        description="List the extents of a transfer URL's image, as "
                    "qemu-img map lists a local image's.",
        epilog=MAP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    extents.add_argument("url", metavar="URL", help="transfer URL")
    extents.add_argument(
        "--context", choices=("zero", "dirty"), default="zero",
        help="zero: data, zeros and holes (default); dirty: what changed "
             "(a backup ticket with \"dirty\": true)")
    _add_options(extents)
    extents.set_defaults(func=run_map)


def _add_options(parser: argparse.ArgumentParser) -> None:
    common.add_connection_options(parser)
    parser.add_argument("--json", dest="output", action="store_const",
                        const=output.JSON, default=output.HUMAN,
                        help="print one JSON document")


def run_info(args: argparse.Namespace) -> int:
    common.setup_logging(args)
    try:
        with _open(args) as sess:
            facts = describe(sess)
        common.print_lines([json.dumps(facts)] if args.output == output.JSON
                           else _info_lines(facts))
    except common.ReaderGone:
        return common.reader_gone()
    except common.REPORTED as e:
        return common.fail("info", e, args.url)
    return 0


def _info_lines(facts: dict[str, Any]) -> list[str]:
    return [
        f"url:          {facts['url']}",
        f"size:         {facts['size']} ({units.human(facts['size'])})",
        f"features:     {', '.join(facts['features']) or '-'}",
        f"allows:       {', '.join(facts['allow'] or ()) or '-'}",
        f"max readers:  {facts['max_readers']}",
        f"max writers:  {facts['max_writers']}",
        f"unix socket:  {facts['unix_socket'] or '-'}",
        f"host id:      {facts['host_id'] or '-'}",
        f"server id:    {facts['server_id'] or '-'}",
        f"transport:    {facts['transport']} "
        f"({facts['transport_address']})",
        f"why:          {facts['transport_reason']}",
    ]


def _open(args: argparse.Namespace) -> client.Session:
    """The transfer, opened as a download would open it."""
    sess: client.Session = client.open(
        args.url, "r", **common.connection_kwargs(args))
    return sess


def describe(sess: client.Session) -> dict[str, Any]:
    """What ``info`` shows, as JSON-ready values."""
    options = sess.options
    return {
        "url": sess.url,
        "size": sess.size(),
        "options_known": options.known,
        "features": sorted(options.features),
        "allow": sorted(options.allow) if options.allow is not None else None,
        "max_readers": options.max_readers,
        "max_writers": options.max_writers,
        "unix_socket": (display_address(
            options.unix_socket)
                        if options.unix_socket else None),
        "host_id": options.host_id,
        "server_id": options.server_id,
        "transport": sess.transport.kind,
        "transport_address": sess.transport.describe(),
        "transport_reason": sess.transport_reason,
    }


def run_map(args: argparse.Namespace) -> int:
    common.setup_logging(args)
    try:
        with _open(args) as sess:
            if "extents" not in sess.features:
                return common.fail("map", client.UnsupportedOperation(
                    "the server offers no extents for this image"))
            common.print_lines(_map_lines(sess, args))
    except common.ReaderGone:
        return common.reader_gone()
    except common.REPORTED as e:
        return common.fail("map", e, args.url)
    return 0


def _map_lines(sess: client.Session,
               args: argparse.Namespace) -> Iterator[str]:
    """The lines ``map`` prints, as the extents arrive."""
    rows = _rows(sess.walk_extents(args.context), args.context)
    if args.output == output.JSON:
        yield json.dumps([row.json(args.context) for row in rows])
        return
    # The first window is asked before the heading: a refused context
    # prints the error alone.
    first = next(rows, None)
    yield f"{'start':>20} {'length':>20}  {'size':>10}  type"
    for row in itertools.chain([first] if first else [], rows):
        yield (f"{row.start:>20} {row.length:>20}  "
               f"{units.human(row.length):>10}  {row.kind}")


@dataclass
class MapRow:
    """Adjacent extents that ``map`` shows alike, as one row."""

    start: int
    length: int
    kind: str
    extent: Extent

    def json(self, context: str) -> dict[str, object]:
        item: dict[str, object] = {"start": self.start,
                                   "length": self.length}
        if context == "dirty":
            item["dirty"] = self.extent.dirty
        else:
            item["zero"] = self.extent.zero
            item["hole"] = self.extent.hole
        item["type"] = self.kind
        return item


def _rows(extents: Iterable[Extent], context: str) -> Iterator[MapRow]:
    """Rows of ``extents``: the server's windows, and extents that differ
    in what this context does not show, split what reads as one."""
    row: MapRow | None = None
    for extent in extents:
        kind = _kind(extent, context)
        if row is not None and row.kind == kind and \
                row.start + row.length == extent.start:
            row.length += extent.length
            continue
        if row is not None:
            yield row
        row = MapRow(extent.start, extent.length, kind, extent)
    if row is not None:
        yield row


def _kind(extent: Extent, context: str) -> str:
    if context == "dirty":
        return "dirty" if extent.dirty else "clean"
    if extent.hole:
        return "hole"
    return "zero" if extent.zero else "data"
