"""``diskferry ticket``: manage tickets on a running daemon's control socket."""

import argparse
import json
import os
import sys
import uuid

from diskferry.errors import DiskferryError

EPILOG = """\
examples:
  diskferry ticket add --size 1073741824 --ops read,write disk.raw
  diskferry ticket add --ops read --dirty nbd:unix:/run/backup/disk.sock
  diskferry ticket show 3f0c...
  diskferry ticket extend 3f0c... 3600
  diskferry ticket del 3f0c...

The control socket is found as 'diskferry serve' would: from --config,
else the embedded default (under $DISKFERRY_STATE_DIR, else ./.diskferry).
"""


def register(subparsers):
    p = subparsers.add_parser(
        "ticket", help="add, show, extend or delete tickets",
        description="Manage the tickets of a running daemon.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="the daemon's TOML configuration")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (overrides the configuration)")
    sub = p.add_subparsers(metavar="ACTION", required=True)

    add = sub.add_parser("add", help="authorize access to an image")
    add.add_argument("path", metavar="IMAGE",
                     help="image file, block device, or NBD URL "
                          "(nbd:unix:/sock, nbd://host/export, "
                          "nbd+unix:///export?socket=/sock)")
    add.add_argument("--id", help="ticket id (default: a new UUID)")
    add.add_argument("--size", type=int,
                     help="image size in bytes (default: the file's or the "
                          "export's size)")
    add.add_argument("--ops", default="read",
                     help="comma separated: read, write (default: read)")
    add.add_argument("--timeout", type=int, default=3600,
                     help="seconds until the ticket expires (default: 3600)")
    add.add_argument("--inactivity-timeout", type=int,
                     help="seconds before idle connections are closed")
    add.add_argument("--sparse", action="store_true",
                     help="zeroing may punch holes")
    add.add_argument("--dirty", action="store_true",
                     help="serve dirty extents (an NBD export with a dirty "
                          "bitmap, for incremental backup)")
    add.add_argument("--transfer-id", help="shown in logs")
    add.set_defaults(func=add_ticket)

    show = sub.add_parser("show", help="print a ticket's state as JSON")
    show.add_argument("id")
    show.set_defaults(func=show_ticket)

    extend = sub.add_parser("extend", help="make a ticket expire later")
    extend.add_argument("id")
    extend.add_argument("timeout", type=int,
                        help="seconds from now until it expires")
    extend.set_defaults(func=extend_ticket)

    delete = sub.add_parser("del", help="cancel and remove a ticket")
    delete.add_argument("id", nargs="?",
                        help="ticket id (omit with --all)")
    delete.add_argument("--all", action="store_true",
                        help="remove every ticket")
    delete.set_defaults(func=delete_ticket)


class ControlError(Exception):
    """Raised when the control service answers with an error."""


def _request(args, method, path, body=None):
    from diskferry.client.uhttp import UnixHTTPConnection
    from diskferry.daemon import config as config_mod

    socket_path = args.socket
    if socket_path is None:
        socket_path = config_mod.load(args.config).control_socket
    con = UnixHTTPConnection(socket_path, timeout=120)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        try:
            con.request(method, path, body=payload, headers=headers)
        except OSError as e:
            raise ControlError(f"cannot reach the control socket "
                               f"{socket_path}: {e.strerror or e}") from e
        res = con.getresponse()
        data = res.read()
    finally:
        con.close()
    if res.status >= 400:
        raise ControlError(f"{res.status} {res.reason}: "
                           f"{data.decode(errors='replace').strip()}")
    return data


def _run(func):
    def wrapper(args):
        try:
            func(args)
        except (ControlError, DiskferryError) as e:
            print(f"diskferry ticket: {e}", file=sys.stderr)
            return 1
        return 0
    return wrapper


NBD_PREFIXES = ("nbd:", "nbd+unix:")


@_run
def add_ticket(args):
    if args.path.startswith(NBD_PREFIXES):
        url = args.path
        size = args.size if args.size is not None else _export_size(url)
    else:
        path = os.path.abspath(args.path)
        url = "file://" + path
        size = args.size if args.size is not None else _file_size(path)
    ticket = {
        "uuid": args.id or str(uuid.uuid4()),
        "size": size,
        "url": url,
        "ops": [op.strip() for op in args.ops.split(",") if op.strip()],
        "timeout": args.timeout,
        "sparse": args.sparse,
        "dirty": args.dirty,
    }
    if args.inactivity_timeout is not None:
        ticket["inactivity_timeout"] = args.inactivity_timeout
    if args.transfer_id:
        ticket["transfer_id"] = args.transfer_id
    _request(args, "PUT", f"/tickets/{ticket['uuid']}", ticket)
    print(ticket["uuid"])


def _file_size(path):
    try:
        with open(path, "rb") as f:
            return f.seek(0, os.SEEK_END)
    except OSError as e:
        raise ControlError(f"cannot read the size of {path}: "
                           f"{e.strerror}; give --size") from e


def _export_size(url):
    from diskferry import nbd

    try:
        client = nbd.open_client(url)
    except (ValueError, nbd.NbdError) as e:
        raise ControlError(f"cannot read the size of {url}: {e}; "
                           f"give --size") from e
    try:
        return client.size
    finally:
        client.close()


@_run
def show_ticket(args):
    data = _request(args, "GET", f"/tickets/{args.id}")
    print(json.dumps(json.loads(data), indent=2, sort_keys=True))


@_run
def extend_ticket(args):
    _request(args, "PATCH", f"/tickets/{args.id}", {"timeout": args.timeout})


@_run
def delete_ticket(args):
    if args.all == bool(args.id):
        raise ControlError("give a ticket id or --all")
    _request(args, "DELETE", f"/tickets/{args.id or ''}")
