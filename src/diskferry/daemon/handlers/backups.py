"""``/backups/{domain}``: backups of running libvirt domains.

``POST`` begins one and answers its disks' tickets and transfer URLs,
``GET`` shows the running jobs (no domain) or one domain's job and
checkpoints, ``DELETE`` ends a domain's job. A diskferry extension: the
job itself is ``daemon.backup``'s.
"""

from __future__ import annotations

from collections.abc import Callable

from diskferry.daemon.backup.manager import BackupManager
from diskferry.daemon.backup.request import BackupRequest
from diskferry.daemon.handlers.jsonbody import read_json, send_json
from diskferry.daemon.handlers.request import Request
from diskferry.errors import BadRequest, NotFound


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
