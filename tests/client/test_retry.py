"""A connection killed mid-transfer: resent on a new connection, within
the retry budget, with a byte-identical result."""

import pytest

from diskferry import client

from .helpers import KINDS, MiB, empty_image, make_image

SIZE = 12 * MiB


def relay_url(srv, proxy, ticket):
    scheme = "https" if srv.tls else "http"
    return f"{scheme}://127.0.0.1:{proxy.port}/images/{ticket['uuid']}"


# Plain TCP exercises the zero-copy paths (sendfile, splice), TLS the
# buffered ones.
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
@pytest.mark.parametrize("kind", KINDS)
def test_upload_survives_a_cut_connection(daemons, make_ticket, relay,
                                          tmp_path, kind, tls):
    srv = daemons.get(kind, tls=tls)
    content = make_image(tmp_path / "src.raw", SIZE, "full")
    target = empty_image(tmp_path / "target.raw", SIZE)
    ticket = make_ticket(srv, target, SIZE)
    proxy = relay(srv, cut_after=5 * MiB + 1234)
    url = relay_url(srv, proxy, ticket)

    result = client.upload(tmp_path / "src.raw", url, cafile=srv.ca_file,
                           unix="never", request_size=MiB,
                           retry=client.Retry(total=2, backoff_factor=0))

    assert proxy.cuts == 1
    assert proxy.connections >= 2
    assert result.data_bytes == SIZE
    assert target.read_bytes() == content


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
@pytest.mark.parametrize("kind", KINDS)
def test_download_resumes_after_a_cut_connection(daemons, make_ticket, relay,
                                                 tmp_path, kind, tls):
    srv = daemons.get(kind, tls=tls)
    content = make_image(tmp_path / "img.raw", SIZE, "full")
    ticket = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    proxy = relay(srv, cut_after=MiB + 777, direction="down")
    url = relay_url(srv, proxy, ticket)

    client.download(url, tmp_path / "dst.raw", cafile=srv.ca_file,
                    unix="never", request_size=2 * MiB, workers=2,
                    retry=client.Retry(total=1, backoff_factor=0))

    assert proxy.cuts == 1
    assert (tmp_path / "dst.raw").read_bytes() == content


def test_no_retries_left_fails_naming_the_offset(daemons, make_ticket, relay,
                                                 tmp_path):
    srv = daemons.get("diskferry")
    make_image(tmp_path / "src.raw", SIZE, "full")
    target = empty_image(tmp_path / "target.raw", SIZE)
    ticket = make_ticket(srv, target, SIZE)
    proxy = relay(srv, cut_after=5 * MiB)
    url = f"https://127.0.0.1:{proxy.port}/images/{ticket['uuid']}"

    with pytest.raises(client.TransferError) as e:
        client.upload(tmp_path / "src.raw", url, cafile=srv.ca_file,
                      unix="never", request_size=MiB,
                      retry=client.Retry(total=0))

    # The cut falls in the request carrying bytes 4-5 MiB (the TLS and
    # HTTP overhead before it is a few KiB).
    assert e.value.offset == 4 * MiB
    assert "offset 4194304" in str(e.value)
    assert isinstance(e.value.__cause__, client.ConnectionFailed)
