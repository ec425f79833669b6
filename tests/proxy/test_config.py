"""``[backend_http]``: the proxy's upstream settings."""

import pytest

from diskferry.daemon import config


def test_defaults():
    section = config.load().backend_http
    assert (section.ca_file, section.connect_timeout, section.read_timeout,
            section.buffer_size) == ("", 10, 60, 8 * 1024**2)


def test_options_are_read(tmp_path):
    path = tmp_path / "diskferry.toml"
    path.write_text('[backend_http]\nca_file = "/etc/pki/upstream-ca.pem"\n'
                    "connect_timeout = 3\nread_timeout = 7\n"
                    "buffer_size = 4194304\n")
    section = config.load(path).backend_http
    assert (section.ca_file, section.connect_timeout, section.read_timeout,
            section.buffer_size) == ("/etc/pki/upstream-ca.pem", 3, 7,
                                     4194304)


@pytest.mark.parametrize("line", ['read_timeout = "7"', "verify = false"])
def test_bad_options_are_refused(tmp_path, line):
    path = tmp_path / "diskferry.toml"
    path.write_text(f"[backend_http]\n{line}\n")
    with pytest.raises(config.ConfigError, match="backend_http"):
        config.load(path)
