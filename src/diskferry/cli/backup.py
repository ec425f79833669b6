"""``diskferry backup``: back up libvirt domains through the daemon.

The daemon begins libvirt's pull-mode backup of a running domain, or
serves a shut off domain's disk files itself, each disk under a ticket
of its own; this command asks it on the control socket and
prints what a client needs to download each disk.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import Callable

from diskferry.cli.arguments import Subparsers
from diskferry.cli.control import (
    CONNECTION_OPTIONS,
    ControlSocket,
    on_control_socket,
)

EPILOG = """\
examples:
  diskferry backup start vm1                 a full backup of every disk
  diskferry backup start vm1 --since diskferry-20261207T101500-000000
                                             what changed since a checkpoint
  diskferry backup start vm1 --disk vda --json
  diskferry backup list                      the running backups
  diskferry backup list vm1                  vm1's backup and checkpoints
  diskferry backup stop vm1
  diskferry backup prune vm1 --keep 2        delete all but vm1's newest
                                             two checkpoints

A backup is libvirt's pull-mode backup of a running domain: QEMU serves
each disk as it was when the backup began (writes since then are not in
it) and the daemon serves it under a read-only ticket, dirty when the
backup starts from a checkpoint (download it with 'diskferry download
--incremental --backing-file PREVIOUS'). Each backup makes a checkpoint,
named by the time it was made; the next backup starts from it. The job
ends with 'backup stop', or when the last of its tickets is deleted or
expires; the daemon then removes its scratch files. It also ends when
the domain stops; its tickets then answer 410 until 'backup stop'.
Only qcow2 disks keep checkpoints; other disks are backed up in full.
Each checkpoint keeps a bitmap in every qcow2 disk, which every write
marks: 'backup prune' deletes the older ones this daemon made (never
while a backup of the domain runs).

A shut off domain is backed up the same way, with the same output: the
daemon serves its disk files read-only (the domain cannot start until
the backup ends) and adds the new checkpoint's bitmap to them itself.
"""

#: What a DOMAIN argument names.
DOMAIN_HELP = "a libvirt domain's name (virsh list --all)"


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "backup", help="back up a libvirt domain, running or shut off",
        description="Back up libvirt domains through the daemon.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[CONNECTION_OPTIONS])
    actions = parser.add_subparsers(metavar="ACTION", required=True)
    start = _action(actions, "start", start_backup,
                    "begin a backup; prints each disk's transfer URL")
    start.add_argument("domain", metavar="DOMAIN", help=DOMAIN_HELP)
    start.add_argument("--disk", action="append", default=[], metavar="NAME",
                       help="a disk to back up, by target (vda); repeat "
                            "for more (default: every disk)")
    since = start.add_mutually_exclusive_group()
    since.add_argument("--full", action="store_true",
                       help="the whole disks (the default)")
    since.add_argument("--since", metavar="CHECKPOINT",
                       help="only what changed since CHECKPOINT")
    start.add_argument("--timeout", type=int, metavar="S",
                       help="seconds the tickets live (default 3600)")
    stop = _action(actions, "stop", stop_backup, "end a domain's backup")
    stop.add_argument("domain", metavar="DOMAIN", help=DOMAIN_HELP)
    listing = _action(actions, "list", list_backups,
                      "running backups, or a domain's backup and checkpoints")
    listing.add_argument("domain", metavar="DOMAIN", nargs="?",
                         help=DOMAIN_HELP)
    pruning = _action(actions, "prune", prune_checkpoints,
                      "delete a domain's older checkpoints (and bitmaps)")
    pruning.add_argument("domain", metavar="DOMAIN", help=DOMAIN_HELP)
    pruning.add_argument("--keep", type=_count, required=True, metavar="N",
                         help="how many of the newest checkpoints to keep "
                              "(0: delete them all)")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is less than 0")
    return value


def _action(actions: Subparsers,
            name: str, func: Callable[[argparse.Namespace, ControlSocket],
                                      None],
            summary: str) -> argparse.ArgumentParser:
    parser = actions.add_parser(
        name, parents=[CONNECTION_OPTIONS], help=summary, description=summary)
    parser.add_argument("--json", action="store_true",
                        help="print the control service's answer")
    parser.set_defaults(func=_run(func))
    return parser


_run = on_control_socket("backup")


def _path(domain: str = "") -> str:
    return "/backups/" + urllib.parse.quote(domain, safe="")


def start_backup(args: argparse.Namespace, control: ControlSocket) -> None:
    body: dict[str, object] = {"disks": list(args.disk)}
    if args.since is not None:
        body["since"] = args.since
    if args.timeout is not None:
        body["timeout"] = args.timeout
    job = json.loads(control.request("POST", _path(args.domain), body))
    if args.json:
        print(json.dumps(job, indent=2))
        return
    _print_job(job)


def stop_backup(args: argparse.Namespace, control: ControlSocket) -> None:
    control.request("DELETE", _path(args.domain))


def list_backups(args: argparse.Namespace, control: ControlSocket) -> None:
    answer = json.loads(control.request("GET", _path(args.domain or "")))
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.domain is None:
        for job in answer:
            _print_job(job)
    else:
        if answer["job"] is not None:
            _print_job(answer["job"])
        print("checkpoints: " + (" ".join(answer["checkpoints"]) or "none"))


def prune_checkpoints(args: argparse.Namespace,
                      control: ControlSocket) -> None:
    answer = json.loads(control.request(
        "POST", _path(args.domain) + "/prune", {"keep": args.keep}))
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    for name in answer["removed"]:
        print(f"removed {name}")
    print("kept: " + (" ".join(answer["kept"]) or "none"))


def _print_job(job: dict[str, object]) -> None:
    since = job["since"] or "(full backup)"
    checkpoint = job["checkpoint"] or "(none: no qcow2 disk)"
    print(f"domain {job['domain']}: checkpoint {checkpoint} since {since}")
    disks = job["disks"]
    assert isinstance(disks, list)
    for disk in disks:
        kind = "dirty" if disk["dirty"] else "full"
        print(f"  {disk['name']}  {disk['size']}  {kind}  "
              f"{disk['transfer_url']}")
