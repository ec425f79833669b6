"""A private CA and a server certificate for the TLS service, made on first start.

A host daemon needs a certificate before it can serve TLS, and an
operator who has not installed one still expects the daemon to start.
So on first start we make a self-signed CA and a server certificate
signed by it; clients trust the CA file (as oVirt clients trust the
engine CA). The ``openssl`` command line does the cryptography, so the
runtime stays standard library only.

Layout of ``directory`` (mode 0700 when created here; keys mode 0600)::

    ca.pem  ca.key  server.pem  server.key

Existing files are reused: when all four are present nothing is done;
when only the CA pair is present a new server certificate is issued by
it, so clients that already trust the CA keep working. Files are made
in a private temporary directory and renamed into place, under a lock,
so a concurrent start never sees a half-written key.
"""

import contextlib
import fcntl
import ipaddress
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from diskferry.errors import DiskferryError

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"
LOCK_NAME = ".lock"

#: The CA outlives many server certificates; clients install it once.
CA_VALIDITY_DAYS = 3650
#: The longest validity browsers and Apple clients accept for a leaf
#: certificate issued after 2019.
SERVER_VALIDITY_DAYS = 825

#: P-256 keys are generated in milliseconds and every TLS client
#: supports them.
KEY_CURVE = "prime256v1"
#: Serial numbers are random (RFC 5280 allows up to 20 octets, positive).
SERIAL_BYTES = 16

CA_SUBJECT = "/O=diskferry/CN=diskferry local CA"

DIRECTORY_MODE = 0o700
KEY_MODE = 0o600
CERT_MODE = 0o644

#: openssl finishes in well under a second; a hung child must not hang
#: the daemon's start.
OPENSSL_TIMEOUT = 60

DEFAULT_HOSTNAMES = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")


class PKIError(DiskferryError):
    """Raised when the certificates cannot be made (openssl missing or failing)."""


@dataclass(frozen=True, slots=True)
class PKIFiles:
    """Paths of the CA and server certificate files."""

    ca_file: Path
    ca_key_file: Path
    cert_file: Path
    key_file: Path


def pki_files(directory: str | os.PathLike[str]) -> PKIFiles:
    """The paths ``ensure_pki`` uses in ``directory``."""
    folder = Path(directory)
    return PKIFiles(
        ca_file=folder / CA_CERT_NAME,
        ca_key_file=folder / CA_KEY_NAME,
        cert_file=folder / SERVER_CERT_NAME,
        key_file=folder / SERVER_KEY_NAME,
    )


def ensure_pki(directory: str | os.PathLike[str],
               hostnames: Iterable[str] = DEFAULT_HOSTNAMES,
               ips: Iterable[str] = DEFAULT_IPS,
               *, openssl: str = "openssl") -> PKIFiles:
    """Return the PKI files in ``directory``, making the missing ones.

    The server certificate has CN = ``hostnames[0]`` and a subjectAltName
    entry for every host name and IP address. ``openssl`` is the command
    to run (a name looked up in PATH, or a path).
    """
    names = tuple(hostnames)
    if not names:
        raise ValueError("at least one host name is needed for the certificate")
    addresses = tuple(str(ipaddress.ip_address(ip)) for ip in ips)

    folder = Path(directory)
    folder.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    files = pki_files(folder)

    with _locked(folder / LOCK_NAME):
        if _all_exist(files.ca_file, files.ca_key_file, files.cert_file,
                      files.key_file):
            return files
        command = _find_openssl(openssl)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".new-") as name:
            tmp = Path(name)
            made = pki_files(tmp)
            if _all_exist(files.ca_file, files.ca_key_file):
                ca_cert, ca_key = files.ca_file, files.ca_key_file
            else:
                _make_ca(command, made.ca_file, made.ca_key_file)
                ca_cert, ca_key = made.ca_file, made.ca_key_file
            _make_server(command, tmp, ca_cert, ca_key, made.cert_file,
                         made.key_file, names, addresses)
            _install(made, files)
    return files


def _all_exist(*paths: Path) -> bool:
    return all(path.exists() for path in paths)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the duration of a block.

    The descriptor is closed however the block ends, the wait for the
    lock included (a signal may end it while another start holds it).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, KEY_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _find_openssl(openssl: str) -> str:
    path = shutil.which(openssl)
    if path is None:
        raise PKIError(
            f"cannot make TLS certificates: {openssl!r} command not found; "
            "install openssl or configure existing certificate files")
    return path


def _make_ca(openssl: str, cert_file: Path, key_file: Path) -> None:
    _run(openssl, "req", "-x509", "-new", "-nodes",
         "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{KEY_CURVE}",
         "-keyout", key_file, "-out", cert_file,
         "-days", str(CA_VALIDITY_DAYS),
         "-set_serial", _random_serial(),
         "-subj", CA_SUBJECT,
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash")


def _make_server(openssl: str, workdir: Path, ca_cert: Path, ca_key: Path,
                 cert_file: Path, key_file: Path, hostnames: Sequence[str],
                 ips: Sequence[str]) -> None:
    request = workdir / "server.csr"
    extensions = workdir / "server.ext"
    extensions.write_text(_server_extensions(hostnames, ips))
    _run(openssl, "req", "-new", "-nodes",
         "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{KEY_CURVE}",
         "-keyout", key_file, "-out", request,
         "-subj", f"/CN={_escape_subject(hostnames[0])}")
    _run(openssl, "x509", "-req", "-in", request,
         "-CA", ca_cert, "-CAkey", ca_key,
         "-set_serial", _random_serial(),
         "-days", str(SERVER_VALIDITY_DAYS),
         "-extfile", extensions, "-out", cert_file)


def _server_extensions(hostnames: Sequence[str], ips: Sequence[str]) -> str:
    names = [f"DNS:{name}" for name in hostnames] + [f"IP:{ip}" for ip in ips]
    return "\n".join([
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=serverAuth",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
        "subjectAltName=" + ",".join(names),
        "",
    ])


def _escape_subject(value: str) -> str:
    """Escape the characters openssl's ``-subj`` syntax gives a meaning."""
    return value.replace("\\", "\\\\").replace("/", "\\/").replace("=", "\\=")


def _random_serial() -> str:
    # Clear the top bit so the DER INTEGER stays positive within the octets.
    serial = secrets.randbits(SERIAL_BYTES * 8 - 1) | 1
    return f"0x{serial:x}"


def _run(openssl: str, *args: str | Path) -> None:
    command = [openssl, *map(str, args)]
    try:
        subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                       check=True, timeout=OPENSSL_TIMEOUT)
    except subprocess.CalledProcessError as e:
        stderr = e.stderr.decode(errors="replace").strip()
        raise PKIError(
            f"openssl {args[0]} failed (exit status {e.returncode}): "
            f"{stderr}") from None
    except subprocess.TimeoutExpired:
        raise PKIError(
            f"openssl {args[0]} did not finish in {OPENSSL_TIMEOUT} seconds"
        ) from None
    except OSError as e:
        raise PKIError(f"cannot run {openssl!r}: {e}") from e


def _install(made: PKIFiles, files: PKIFiles) -> None:
    """Move the new files into place, keys first so a cert never lacks its key."""
    pairs = [
        (made.ca_key_file, files.ca_key_file, KEY_MODE),
        (made.ca_file, files.ca_file, CERT_MODE),
        (made.key_file, files.key_file, KEY_MODE),
        (made.cert_file, files.cert_file, CERT_MODE),
    ]
    for source, target, mode in pairs:
        if source.exists():
            os.chmod(source, mode)
            os.replace(source, target)
