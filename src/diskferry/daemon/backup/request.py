"""What ``POST /backups/{domain}`` and ``.../prune`` ask for, validated."""

from __future__ import annotations

from dataclasses import dataclass

from diskferry.daemon.jsonfield import field
from diskferry.daemon.tickets import MAX_TIMEOUT
from diskferry.errors import BadRequest

#: Seconds a backup's tickets live unless the request says otherwise.
DEFAULT_TIMEOUT = 3600

#: Most checkpoints a prune may be asked to keep: more than any domain
#: has (each is a bitmap in every disk).
MAX_CHECKPOINTS = 10_000


@dataclass(frozen=True)
class BackupRequest:
    """A backup to begin: which disks (none named: every disk), and the
    checkpoint it starts from (None: a full backup)."""

    domain: str
    disks: tuple[str, ...] = ()
    since: str | None = None
    timeout: int = DEFAULT_TIMEOUT

    @classmethod
    def from_dict(cls, domain: str, d: object) -> BackupRequest:
        if not domain:
            raise BadRequest("A domain name is required: /backups/DOMAIN")
        if not isinstance(d, dict):
            raise BadRequest("Body must be a JSON object")
        disks = field(d, "disks", list, [])
        if not all(isinstance(name, str) and name for name in disks):
            raise BadRequest("Invalid field 'disks': a list of disk names "
                             "(vda, sdb, ...)")
        since = field(d, "since", str)
        if since == "":
            raise BadRequest("Invalid field 'since': a checkpoint name")
        return cls(domain=domain, disks=tuple(disks), since=since,
                   timeout=field(d, "timeout", int, DEFAULT_TIMEOUT,
                                 minimum=1, maximum=MAX_TIMEOUT))


def checkpoints_to_keep(d: object) -> int:
    """What ``POST /backups/{domain}/prune`` asks for: ``{"keep": N}``,
    the newest checkpoints to keep."""
    if not isinstance(d, dict):
        raise BadRequest("Body must be a JSON object")
    return field(d, "keep", int, required=True, minimum=0,
                 maximum=MAX_CHECKPOINTS)
