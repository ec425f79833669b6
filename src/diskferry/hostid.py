"""This host's identity, shared by the daemon (OPTIONS ``host_id``) and the
client (is the server on this host?).

The id oVirt's engine knows the host by comes first, then the systemd
machine id. Neither is sent as it is: systemd documents the machine id
as confidential. Both sides derive the same value from it under
diskferry's application id, the way ``sd_id128_get_machine_app_specific()``
does (HMAC-SHA256 keyed by the host's id, the first 128 bits as a UUID),
so a client on the same host recognizes it while nobody learns the id.
"""

import hashlib
import hmac
import uuid

HOST_ID_FILES = ("/etc/vdsm/vdsm.id", "/etc/machine-id")

#: diskferry's application id, the message the host's id is the key for.
APP_ID = uuid.UUID("d01d52f4-8ed8-40f0-939b-1bb50e7b4d50").bytes


def host_id(files: tuple[str, ...] = HOST_ID_FILES) -> str | None:
    """This host's derived id, or None when no id file is readable."""
    raw = _read_id(files)
    if raw is None:
        return None
    digest = hmac.new(raw.encode(), APP_ID, hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def _read_id(files: tuple[str, ...]) -> str | None:
    for path in files:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value:
            return value
    return None
