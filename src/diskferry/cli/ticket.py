"""``diskferry ticket``: manage tickets on a running daemon's control socket."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import uuid
from collections.abc import Callable

from diskferry.cli import arguments, common, tickettable, ticketwatch
from diskferry.cli.arguments import Subparsers
from diskferry.cli.control import (
    CONNECTION_OPTIONS,
    ControlError,
    ControlSocket,
    on_control_socket,
)
from diskferry.cli.ticketimage import (
    RAW,
    UpstreamAccess,
    image_format,
    image_size,
    ticket_url,
)

#: Longest ticket timeout the daemon accepts (a year), as in its tickets.
MAX_TIMEOUT = 365 * 24 * 3600

EPILOG = """\
examples:
  diskferry ticket add --ops read,write disk.raw
  diskferry ticket add --ops read --dirty nbd:unix:/run/backup/disk.sock
  diskferry ticket list
  diskferry ticket list --watch
  diskferry ticket show 3f0c...
  diskferry ticket extend 3f0c... 3600
  diskferry ticket del 3f0c...

The control socket is found as 'diskferry serve' finds it, whatever the
current folder: --socket, else the configuration (--config, --conf-dir),
else the default run folder (/run/diskferry for root,
$XDG_RUNTIME_DIR/diskferry for a user, $DISKFERRY_STATE_DIR/run when
that is set). A failure says where it looked.
"""

ADD_DESCRIPTION = """\
Authorize access to an image: the daemon serves IMAGE under
/images/ID to whoever presents ID, for the operations given, until the
ticket expires or is deleted. Prints the ticket's id.
"""

ADD_EPILOG = f"""\
examples:
  diskferry ticket add disk.raw                  read-only, new random id
  diskferry ticket add --ops read,write --sparse disk.raw
  diskferry ticket add --id upload-1 --ops write --size 10G /dev/vg/lv
  diskferry ticket add --ops read nbd:unix:/run/vdsm/nbd/disk.sock
  diskferry ticket add --ops read,write https://host-17:54322/images/ID
                                                 a proxy ticket
  diskferry ticket add disk.qcow2                the guest's disk
  diskferry ticket add --dirty --bitmap b1 disk.qcow2
                                                 what changed since b1
  diskferry ticket add --format raw disk.qcow2   the qcow2 file's bytes

An image file in a format qemu reads (qcow2, vmdk, vdi, ...; probed as
an upload probes its source) is served as the guest sees its disk: the
daemon runs a qemu-nbd for the ticket, from add until the ticket ends,
and refuses the ticket if qemu cannot open the image (a running VM holds
it, a backing file is missing, it is encrypted). --format raw serves the
file's bytes as they are.

A transfer URL (https:// or http://) as IMAGE makes this daemon a proxy
for that server's image; its size is asked of the server (give --cafile
when the server's certificate is not signed by a system CA).

{textwrap.fill(
    "The ticket's id is a bearer secret: anyone who knows it may use the "
    "image. The default random id (a UUID) is the safe choice. An id "
    f"given with --id is made of {arguments.TICKET_ID_RULE}.", 72)}
"""

#: The action a parsed command line runs: returns the exit status.
Action = Callable[[argparse.Namespace], int]

LIST_EPILOG = """\
Columns: the id (shortened as the daemon's log shows it, unless
--full-ids), the image's url, the operations allowed, the size, the
bytes transferred (tickets with one op), client connections, time since
last used, and when the ticket expires (local time, and how long from
now). --json prints the control service's answer (expires in the
daemon's monotonic seconds) for scripts.

--watch polls the daemon every SECONDS (default 2) and adds RATE, how
fast TRANSFERRED grew since the poll before. On a terminal the table is
redrawn in place; into a pipe or a file, a table is written each time
under the date and time. Ctrl-C stops it (status 130).
"""

SHOW_EPILOG = """\
The fields of 'ticket list', and the rest of the ticket. --json prints
the control service's answer for scripts.
"""


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "ticket", help="add, list, show, extend or delete tickets",
        description="Manage the tickets of a running daemon.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[CONNECTION_OPTIONS])
    actions = parser.add_subparsers(metavar="ACTION", required=True)
    _register_add(actions)
    _register_views(actions)
    _register_changes(actions)


def _action(actions: Subparsers, name: str, func: Action, summary: str,
            description: str | None = None,
            epilog: str | None = None) -> argparse.ArgumentParser:
    parser = actions.add_parser(
        name, parents=[CONNECTION_OPTIONS], help=summary, description=description,
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def _register_add(actions: Subparsers) -> None:
    add = _action(actions, "add", add_ticket, "authorize access to an image",
                  description=ADD_DESCRIPTION, epilog=ADD_EPILOG)
    add.add_argument("path", metavar="IMAGE",
                     help="image file, block device, NBD URL "
                          "(nbd:unix:/sock, nbd://host/export, "
                          "nbd+unix:///export?socket=/sock) or another "
                          "server's transfer URL (https://host:port/"
                          "images/ID: a proxy ticket)")
    add.add_argument("--id", type=arguments.ticket_id,
                     help="ticket id (default: a new UUID)")
    add.add_argument("--size", type=arguments.size(0, arguments.MAX_SIZE),
                     help="image size in bytes, or with K, M, G, T "
                          "(binary: 1G = 1073741824) (default: the file's, "
                          "the export's or the upstream image's size)")
    add.add_argument("--format", metavar="FORMAT",
                     help="the image file's format: raw serves its bytes, "
                          "qcow2, vmdk, vdi, ... the guest's disk (default: "
                          "probed)")
    add.add_argument("--no-backing-chain", dest="backing_chain",
                     action="store_false",
                     help="serve the image's top layer alone, unallocated "
                          "ranges as holes (a format other than raw)")
    add.add_argument("--bitmap", metavar="NAME",
                     help="with --dirty: the persistent bitmap whose dirty "
                          "extents are served (a qcow2 image)")
    add.add_argument("--cafile", metavar="FILE", type=arguments.ca_file,
                     help="CA certificate to verify an https:// IMAGE's "
                          "server with, when asking its size (default: "
                          "system CAs)")
    _add_access_arguments(add)


def _add_access_arguments(add: argparse.ArgumentParser) -> None:
    """What the ticket allows, for how long, and how it is logged."""
    add.add_argument("--ops", default=["read"],
                     type=arguments.word_list(("read", "write")),
                     help="comma separated: read, write (default: read)")
    add.add_argument("--timeout", type=arguments.integer(0, MAX_TIMEOUT),
                     default=3600,
                     help="seconds until the ticket expires (default: 3600)")
    add.add_argument("--inactivity-timeout",
                     type=arguments.integer(0, MAX_TIMEOUT),
                     help="seconds before idle connections are closed")
    add.add_argument("--sparse", action="store_true",
                     help="zeroing may punch holes")
    add.add_argument("--dirty", action="store_true",
                     help="serve dirty extents (an NBD export with a dirty "
                          "bitmap, for incremental backup)")
    add.add_argument("--transfer-id", help="shown in logs")


def _register_views(actions: Subparsers) -> None:
    listing = _action(actions, "list", list_tickets,
                      "print every ticket as a table", epilog=LIST_EPILOG)
    output = listing.add_mutually_exclusive_group()
    output.add_argument("--watch", nargs="?", metavar="SECONDS",
                        type=watch_interval,
                        const=ticketwatch.DEFAULT_INTERVAL,
                        help="print the table again every SECONDS "
                             f"(default {ticketwatch.DEFAULT_INTERVAL:g}), "
                             "with each transfer's rate, until Ctrl-C")
    _add_view_options(listing, output.add_argument)
    show = _action(actions, "show", show_ticket,
                   "print a ticket's state, a field a line",
                   epilog=SHOW_EPILOG)
    show.add_argument("id", type=arguments.ticket_id)
    _add_view_options(show, show.add_argument)


def watch_interval(text: str) -> float:
    """``--watch``'s SECONDS: polling faster than MIN_INTERVAL only loads
    the daemon."""
    value = arguments.seconds(text)
    if value < ticketwatch.MIN_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: at least "
            f"{ticketwatch.MIN_INTERVAL:g} seconds")
    return value


def _add_view_options(parser: argparse.ArgumentParser,
                      add_output: Callable[..., argparse.Action]) -> None:
    """--json is added by ``add_output``: a group's, where another way of
    printing excludes it."""
    add_output("--json", action="store_true",
               help="print the control service's JSON unchanged")
    parser.add_argument("--full-ids", action="store_true",
                        help="print ticket ids whole (they are secrets: "
                             "shortened by default, as in logs)")


def _register_changes(actions: Subparsers) -> None:
    extend = _action(actions, "extend", extend_ticket,
                     "make a ticket expire later")
    extend.add_argument("id", type=arguments.ticket_id)
    extend.add_argument("timeout", type=arguments.integer(0, MAX_TIMEOUT),
                        help="seconds from now until it expires")
    delete = _action(actions, "del", delete_ticket,
                     "cancel and remove a ticket")
    delete.add_argument("id", nargs="?", type=arguments.ticket_id,
                        help="ticket id (omit with --all)")
    delete.add_argument("--all", action="store_true",
                        help="remove every ticket")


_run = on_control_socket("ticket")


@_run
def add_ticket(args: argparse.Namespace, control: ControlSocket) -> None:
    if args.bitmap is not None and not args.dirty:
        raise ControlError("--bitmap needs --dirty")
    fmt = image_format(args.path, args.format)
    size = args.size
    if size is None:
        size = image_size(args.path, UpstreamAccess(cafile=args.cafile), fmt)
    ticket: dict[str, object] = {
        "uuid": args.id or str(uuid.uuid4()),
        "size": size,
        "url": ticket_url(args.path),
        "ops": args.ops,
        "timeout": args.timeout,
        "sparse": args.sparse,
        "dirty": args.dirty,
    }
    if args.inactivity_timeout is not None:
        ticket["inactivity_timeout"] = args.inactivity_timeout
    if args.transfer_id:
        ticket["transfer_id"] = args.transfer_id
    ticket.update(_format_fields(args, fmt))
    control.request("PUT", f"/tickets/{ticket['uuid']}", ticket)
    print(ticket["uuid"])


def _format_fields(args: argparse.Namespace, fmt: str) -> dict[str, object]:
    """The ticket's format extension; nothing for a raw image, so that a
    daemon that knows no formats takes the ticket."""
    fields: dict[str, object] = {}
    if fmt != RAW:
        fields["format"] = fmt
    if not args.backing_chain:
        fields["backing_chain"] = False
    if args.bitmap is not None:
        fields["bitmap"] = args.bitmap
    return fields


@_run
def list_tickets(args: argparse.Namespace, control: ControlSocket) -> None:
    if args.watch is not None:
        _watch(args, control)
        return
    infos = _tickets(control)
    if args.json:
        print(json.dumps(infos, indent=2, sort_keys=True))
    elif infos:
        print(tickettable.table(infos, full_ids=args.full_ids))
    else:
        print("no tickets", file=sys.stderr)


@_run
def show_ticket(args: argparse.Namespace, control: ControlSocket) -> None:
    info = json.loads(control.request("GET", f"/tickets/{args.id}"))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(tickettable.details(info, full_ids=args.full_ids))


@_run
def extend_ticket(args: argparse.Namespace, control: ControlSocket) -> None:
    control.request("PATCH", f"/tickets/{args.id}",
                    {"timeout": args.timeout})


@_run
def delete_ticket(args: argparse.Namespace, control: ControlSocket) -> None:
    if args.all == bool(args.id):
        raise ControlError("give a ticket id or --all")
    control.request("DELETE", f"/tickets/{args.id or ''}")


def _tickets(control: ControlSocket) -> list[tickettable.TicketInfo]:
    infos: list[tickettable.TicketInfo] = json.loads(
        control.request("GET", "/tickets/"))
    return infos


def _watch(args: argparse.Namespace, control: ControlSocket) -> None:
    """``list --watch``; its reader gone (``| head``) ends it quietly."""
    try:
        ticketwatch.watch(lambda: _tickets(control),
                          ticketwatch.display_for(sys.stdout, args.watch),
                          args.watch, full_ids=args.full_ids)
    except common.ReaderGone:
        sys.exit(common.reader_gone())
