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
import json
from typing import Any

from diskferry import client
from diskferry.cli import common, output, units
from diskferry.cli.arguments import Subparsers
from diskferry.client.uhttp import display_address
from diskferry.extent import Extent

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
it changed since the backup's checkpoint.
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
    except common.REPORTED as e:
        return common.fail("info", e, args.url)
    if args.output == output.JSON:
        print(json.dumps(facts))
        return 0
    print(f"url:          {facts['url']}")
    print(f"size:         {facts['size']} ({units.human(facts['size'])})")
    print(f"features:     {', '.join(facts['features']) or '-'}")
    print(f"allows:       {', '.join(facts['allow'] or ()) or '-'}")
    print(f"max readers:  {facts['max_readers']}")
    print(f"max writers:  {facts['max_writers']}")
    print(f"unix socket:  {facts['unix_socket'] or '-'}")
    print(f"host id:      {facts['host_id'] or '-'}")
    print(f"server id:    {facts['server_id'] or '-'}")
    print(f"transport:    {facts['transport']} ({facts['transport_address']})")
    print(f"why:          {facts['transport_reason']}")
    return 0


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
            if args.output == output.JSON:
                print(json.dumps([_extent_json(e, args.context)
                                  for e in sess.walk_extents(args.context)]))
                return 0
            print(f"{'start':>20} {'length':>20}  {'size':>10}  type")
            for e in sess.walk_extents(args.context):
                print(f"{e.start:>20} {e.length:>20}  "
                      f"{units.human(e.length):>10}  "
                      f"{_kind(e, args.context)}")
    except common.REPORTED as e:
        return common.fail("map", e, args.url)
    return 0


def _kind(extent: Extent, context: str) -> str:
    if context == "dirty":
        return "dirty" if extent.dirty else "clean"
    if extent.hole:
        return "hole"
    return "zero" if extent.zero else "data"


def _extent_json(extent: Extent, context: str) -> dict[str, object]:
    item: dict[str, object] = {"start": extent.start, "length": extent.length}
    if context == "dirty":
        item["dirty"] = extent.dirty
    else:
        item["zero"] = extent.zero
        item["hole"] = extent.hole
    item["type"] = _kind(extent, context)
    return item
