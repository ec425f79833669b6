"""``diskferry ticket``: manage tickets on a running daemon's control socket."""

import argparse
import json
import os
import sys
import uuid

from diskferry.cli import argtypes
from diskferry.errors import DiskferryError

#: Longest ticket timeout the daemon accepts (a year), as in its tickets.
MAX_TIMEOUT = 365 * 24 * 3600

EPILOG = """\
examples:
  diskferry ticket add --ops read,write disk.raw
  diskferry ticket add --ops read --dirty nbd:unix:/run/backup/disk.sock
  diskferry ticket list
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

ADD_EPILOG = """\
examples:
  diskferry ticket add disk.raw                  read-only, new random id
  diskferry ticket add --ops read,write --sparse disk.raw
  diskferry ticket add --id upload-1 --ops write --size 10G /dev/vg/lv
  diskferry ticket add --ops read nbd:unix:/run/vdsm/nbd/disk.sock

The ticket's id is a bearer secret: anyone who knows it may use the
image. The default random id (a UUID) is the safe choice.
"""

#: Options every action takes, after "ticket" or after the action
#: ("ticket add --config F" as well as "ticket --config F add"). SUPPRESS
#: keeps an action's parser from overwriting a value given before it.
_CONNECTION = argparse.ArgumentParser(add_help=False)
_CONNECTION.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                         help="the daemon's TOML configuration")
_CONNECTION.add_argument("--conf-dir", metavar="DIR",
                         default=argparse.SUPPRESS,
                         help="the daemon's configuration folder "
                              "(DIR/conf.d/*.toml)")
_CONNECTION.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                         help="control socket (overrides the configuration)")


def register(subparsers):
    p = subparsers.add_parser(
        "ticket", help="add, list, show, extend or delete tickets",
        description="Manage the tickets of a running daemon.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_CONNECTION])
    sub = p.add_subparsers(metavar="ACTION", required=True)

    def action(name, **kwargs):
        return sub.add_parser(name, parents=[_CONNECTION], **kwargs)

    add = action("add", help="authorize access to an image",
                 description=ADD_DESCRIPTION, epilog=ADD_EPILOG,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("path", metavar="IMAGE",
                     help="image file, block device, or NBD URL "
                          "(nbd:unix:/sock, nbd://host/export, "
                          "nbd+unix:///export?socket=/sock)")
    add.add_argument("--id", help="ticket id (default: a new UUID)")
    add.add_argument("--size", type=argtypes.size,
                     help="image size in bytes, or with K, M, G, T "
                          "(binary: 1G = 1073741824) (default: the file's "
                          "or the export's size)")
    add.add_argument("--ops", default=["read"],
                     type=argtypes.word_list(("read", "write")),
                     help="comma separated: read, write (default: read)")
    add.add_argument("--timeout", type=argtypes.integer(0, MAX_TIMEOUT),
                     default=3600,
                     help="seconds until the ticket expires (default: 3600)")
    add.add_argument("--inactivity-timeout",
                     type=argtypes.integer(0, MAX_TIMEOUT),
                     help="seconds before idle connections are closed")
    add.add_argument("--sparse", action="store_true",
                     help="zeroing may punch holes")
    add.add_argument("--dirty", action="store_true",
                     help="serve dirty extents (an NBD export with a dirty "
                          "bitmap, for incremental backup)")
    add.add_argument("--transfer-id", help="shown in logs")
    add.set_defaults(func=add_ticket)

    listing = action("list", help="print every ticket as JSON")
    listing.set_defaults(func=list_tickets)

    show = action("show", help="print a ticket's state as JSON")
    show.add_argument("id")
    show.set_defaults(func=show_ticket)

    extend = action("extend", help="make a ticket expire later")
    extend.add_argument("id")
    extend.add_argument("timeout", type=argtypes.integer(0, MAX_TIMEOUT),
                        help="seconds from now until it expires")
    extend.set_defaults(func=extend_ticket)

    delete = action("del", help="cancel and remove a ticket")
    delete.add_argument("id", nargs="?",
                        help="ticket id (omit with --all)")
    delete.add_argument("--all", action="store_true",
                        help="remove every ticket")
    delete.set_defaults(func=delete_ticket)


class ControlError(Exception):
    """Raised when the control service answers with an error."""


def control_socket(args):
    """(path, how it was found): as ``diskferry serve`` would bind it."""
    from diskferry.daemon import config as config_mod

    socket_path = getattr(args, "socket", None)
    if socket_path is not None:
        return socket_path, "--socket"
    config = config_mod.load(getattr(args, "config", None),
                             getattr(args, "conf_dir", None))
    if config.control.transport != "unix":
        raise ControlError("the daemon's control service is on TCP "
                           "([control] transport); this command speaks "
                           "to a UNIX socket only: give --socket")
    return config.control_socket, config.control_socket_origin()


def _request(args, method, path, body=None):
    from diskferry.client.uhttp import UnixHTTPConnection

    socket_path, origin = args.control
    con = UnixHTTPConnection(socket_path, timeout=120)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        try:
            con.request(method, path, body=payload, headers=headers)
        except OSError as e:
            raise ControlError(
                f"cannot reach the control socket {socket_path} "
                f"({origin}): {e.strerror or e}; is the daemon running? "
                f"Give --socket, or the daemon's --config or "
                f"--conf-dir") from e
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
        from diskferry.daemon.config import ConfigError

        try:
            args.control = control_socket(args)
            func(args)
        except ConfigError as e:
            print(f"diskferry ticket: {e}", file=sys.stderr)
            return 2
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
        "ops": args.ops,
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
def list_tickets(args):
    data = _request(args, "GET", "/tickets/")
    print(json.dumps(json.loads(data), indent=2, sort_keys=True))


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
