"""The generated CA and server certificate, checked with real TLS handshakes."""

import fcntl
import os
import signal
import socket
import ssl
import stat
import subprocess
import threading

import pytest

from diskferry.daemon import pki

# A handshake on localhost completes at once; this only bounds a failure.
HANDSHAKE_TIMEOUT = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return pki.ensure_pki(tmp_path_factory.mktemp("pki") / "tls")


def handshake(files, connect_to, server_hostname):
    """Serve one TLS connection with the server cert; return the client's view."""
    family = socket.AF_INET6 if ":" in connect_to else socket.AF_INET
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(files.cert_file, files.key_file)
    client_context = ssl.create_default_context(cafile=str(files.ca_file))
    # What Python 3.13 turns on by default: RFC 5280 conformance.
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT

    with socket.socket(family) as listener:
        listener.bind((connect_to, 0))
        listener.listen()
        errors = []

        def serve():
            try:
                conn, _ = listener.accept()
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except OSError as e:
                errors.append(e)

        server = threading.Thread(target=serve)
        server.start()
        try:
            address = listener.getsockname()[:2]
            with socket.create_connection(address, HANDSHAKE_TIMEOUT) as sock:
                with client_context.wrap_socket(
                        sock, server_hostname=server_hostname) as tls:
                    return tls.recv(5), tls.getpeercert()
        finally:
            server.join(HANDSHAKE_TIMEOUT)


@pytest.mark.parametrize("connect_to, server_hostname", [
    ("127.0.0.1", "localhost"),
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
])
def test_handshake_verifies_against_ca(files, connect_to, server_hostname):
    if connect_to == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    data, peer = handshake(files, connect_to, server_hostname)
    assert data == b"hello"
    assert dict(pair[0] for pair in peer["subject"]) == {"commonName": "localhost"}
    assert set(peer["subjectAltName"]) == {
        ("DNS", "localhost"), ("IP Address", "127.0.0.1"),
        ("IP Address", "0:0:0:0:0:0:0:1")}


def test_wrong_name_is_rejected(files):
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(files, "127.0.0.1", "other.example")


def openssl_text(path):
    return subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(path)],
        check=True, capture_output=True, text=True).stdout


def test_certificate_extensions(files):
    ca = openssl_text(files.ca_file)
    assert "CA:TRUE" in ca
    assert "Certificate Sign" in ca
    server = openssl_text(files.cert_file)
    assert "CA:FALSE" in server
    assert "TLS Web Server Authentication" in server


def validity_days(path):
    dates = subprocess.run(
        ["openssl", "x509", "-noout", "-startdate", "-enddate", "-in", str(path)],
        check=True, capture_output=True, text=True).stdout
    fields = dict(line.split("=", 1) for line in dates.splitlines())
    start = ssl.cert_time_to_seconds(fields["notBefore"])
    end = ssl.cert_time_to_seconds(fields["notAfter"])
    return (end - start) // 86400


def test_validity(files):
    assert validity_days(files.ca_file) == pki.CA_VALIDITY_DAYS
    assert validity_days(files.cert_file) == pki.SERVER_VALIDITY_DAYS


def test_permissions(files):
    directory = files.ca_file.parent
    assert stat.S_IMODE(directory.stat().st_mode) == pki.DIRECTORY_MODE
    for key in (files.key_file, files.ca_key_file):
        assert stat.S_IMODE(key.stat().st_mode) == pki.KEY_MODE
    for cert in (files.cert_file, files.ca_file):
        assert stat.S_IMODE(cert.stat().st_mode) == pki.CERT_MODE
    # No temporary files are left behind.
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [".lock", "ca.key", "ca.pem", "server.key", "server.pem"])


def all_paths(files):
    return [files.ca_file, files.ca_key_file, files.cert_file, files.key_file]


def test_second_call_reuses_files(tmp_path):
    first = pki.ensure_pki(tmp_path / "tls")
    before = {p: p.read_bytes() for p in all_paths(first)}
    second = pki.ensure_pki(tmp_path / "tls", hostnames=("other.example",))
    assert second == first
    assert {p: p.read_bytes() for p in all_paths(second)} == before


def test_missing_server_cert_is_reissued_by_same_ca(tmp_path):
    first = pki.ensure_pki(tmp_path / "tls")
    ca = first.ca_file.read_bytes()
    old_cert = first.cert_file.read_bytes()
    first.cert_file.unlink()
    second = pki.ensure_pki(tmp_path / "tls")
    assert second.ca_file.read_bytes() == ca
    assert second.cert_file.read_bytes() != old_cert
    data, _ = handshake(second, "127.0.0.1", "localhost")
    assert data == b"hello"


def test_custom_names(tmp_path):
    files = pki.ensure_pki(tmp_path / "tls", hostnames=("host.example", "h2"),
                           ips=("127.0.0.1",))
    data, peer = handshake(files, "127.0.0.1", "host.example")
    assert data == b"hello"
    assert ("DNS", "h2") in peer["subjectAltName"]
    assert dict(pair[0] for pair in peer["subject"]) == {
        "commonName": "host.example"}


def test_openssl_missing(tmp_path):
    with pytest.raises(pki.PKIError, match="not found"):
        pki.ensure_pki(tmp_path / "tls", openssl="no-such-openssl")
    assert not (tmp_path / "tls" / "ca.pem").exists()


def test_openssl_failure_reports_stderr(tmp_path):
    fake = tmp_path / "openssl"
    fake.write_text("#!/bin/sh\necho 'unable to load config' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(pki.PKIError, match="exit status 3.*unable to load config"):
        pki.ensure_pki(tmp_path / "tls", openssl=str(fake))
    assert not (tmp_path / "tls" / "ca.pem").exists()


def test_bad_ip_is_rejected(tmp_path):
    with pytest.raises(ValueError):
        pki.ensure_pki(tmp_path / "tls", ips=("not-an-ip",))


def test_directory_created_private(tmp_path):
    old = os.umask(0)
    try:
        files = pki.ensure_pki(tmp_path / "a" / "tls")
    finally:
        os.umask(old)
    assert stat.S_IMODE(files.ca_file.parent.stat().st_mode) == 0o700


class Interrupted(Exception):
    pass


def descriptors_of(path):
    """This process's descriptors open on ``path``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
        except FileNotFoundError:
            pass  # the descriptor of the listing itself
    return found


def test_interrupted_lock_wait_closes_the_lock_file(tmp_path):
    # Another start holds the lock; a signal ends this one's wait for it.
    folder = tmp_path / "tls"
    folder.mkdir()
    lock = folder / pki.LOCK_NAME
    holder = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            pki.ensure_pki(folder)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    try:
        assert descriptors_of(lock) == [holder]
    finally:
        os.close(holder)
    assert not (folder / "ca.pem").exists()
