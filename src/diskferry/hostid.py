"""This host's identity, shared by the daemon (OPTIONS ``host_id``) and the
client (is the server on this host?).

The id oVirt's engine knows the host by comes first, then the systemd
machine id: both sides read the same file and compare.
"""

HOST_ID_FILES = ("/etc/vdsm/vdsm.id", "/etc/machine-id")


def host_id(files=HOST_ID_FILES):
    """This host's id, or None when no id file is readable."""
    for path in files:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value:
            return value
    return None
