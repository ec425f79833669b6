"""``/backups/{domain}``: backups of libvirt domains.

``POST`` begins one and answers its disks' tickets and transfer URLs,
``GET`` shows the running jobs (no domain) or one domain's job and
checkpoints, ``DELETE`` ends a domain's job; ``POST .../prune`` deletes
its older checkpoints. A diskferry extension: the jobs themselves are
``daemon.backup``'s.
"""

from __future__ import annotations

from collections.abc import Callable

from diskferry.daemon.backup.manager import BackupManager
from diskferry.daemon.backup.request import BackupRequest, checkpoints_to_keep
from diskferry.daemon.handlers.jsonbody import read_json, send_json
from diskferry.daemon.handlers.request import Request
from diskferry.errors import BadRequest, NotFound


def backup_routes(backups: BackupManager,
                  images_url: Callable[[], str]) -> list[tuple[str, object]]:
    """The control service's routes of backups."""
    return [(r"/backups/([^/]+)/prune", PruneHandler(backups)),
            (r"/backups/([^/]*)", BackupsHandler(backups, images_url))]


class BackupsHandler:
    """``images_url()`` is the images API's base URL, which a disk's
    transfer URL starts with."""

    def __init__(self, backups: BackupManager,
                 images_url: Callable[[], str]) -> None:
        self.backups = backups
        self.images_url = images_url

    def get(self, request: Request, domain: str) -> None:
        url = self.images_url()
        if not domain:
            send_json(request, [job.describe(url)
                                for job in self.backups.jobs()])
            return
        try:
            job: dict[str, object] | None = \
                self.backups.job(domain).describe(url)
        except NotFound:
            job = None
        send_json(request, {"domain": domain, "job": job,
                            "checkpoints": self.backups.checkpoints(domain)})

    def post(self, request: Request, domain: str) -> None:
        backup = BackupRequest.from_dict(domain, read_json(request))
        job = self.backups.start(backup)
        send_json(request, job.describe(self.images_url()), status=201)

    def delete(self, request: Request, domain: str) -> None:
        if not domain:
            raise BadRequest("A domain name is required: /backups/DOMAIN")
        self.backups.stop(domain)
        request.conn.send_response(204)


class PruneHandler:
    """``POST /backups/{domain}/prune`` + ``{"keep": N}``: 200 and what
    was removed and kept."""

    def __init__(self, backups: BackupManager) -> None:
        self.backups = backups

    def post(self, request: Request, domain: str) -> None:
        keep = checkpoints_to_keep(read_json(request))
        send_json(request, self.backups.prune(domain, keep).describe())
