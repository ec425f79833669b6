"""The option rules of a copy, said once by the library: the functions
as tables, and upload()/download() refusing before any request."""

import pytest

from diskferry import client
from diskferry.client.rules import (
    OptionConflict,
    Rule,
    download_conflict,
    upload_conflict,
)

UPLOAD = dict(format=None, member=None, single_layer=False, size=None)
DOWNLOAD = dict(format="raw", backing_file=None, incremental=False,
                resume=False)


@pytest.mark.parametrize("path,options,rule", [
    ("disk.raw", {}, None),
    ("-", {"size": 10}, None),
    ("-", {"format": "raw"}, None),
    ("disk.qcow2", {"single_layer": True, "verify": True},
     Rule.VERIFY_SINGLE_LAYER),
    ("-", {"format": "qcow2"}, Rule.STREAM_UPLOAD_FORMAT),
    ("-", {"member": "disk1.vmdk"}, Rule.STREAM_UPLOAD_FORMAT),
    ("-", {"verify": True}, Rule.STREAM_REREAD),
    ("disk.raw", {"size": 10}, Rule.SIZE_WITHOUT_STREAM),
])
def test_upload_rules(path, options, rule):
    assert upload_conflict(path, **{**UPLOAD, **options}) is rule


@pytest.mark.parametrize("path,options,rule", [
    ("disk.raw", {}, None),
    ("-", {}, None),
    ("inc.qcow2", {"format": "qcow2", "backing_file": "full.qcow2",
                   "incremental": True}, None),
    ("inc.qcow2", {"format": "qcow2", "incremental": True},
     Rule.INCREMENTAL_WITHOUT_BACKING),
    ("disk.raw", {"backing_file": "full.qcow2"}, Rule.BACKING_RAW),
    ("disk.vmdk", {"format": "vmdk"}, Rule.DOWNLOAD_FORMAT),
    ("disk.qcow2", {"format": "qcow2", "resume": True}, Rule.RESUME_NOT_RAW),
    ("-", {"format": "qcow2"}, Rule.STREAM_DOWNLOAD_FORMAT),
    ("-", {"resume": True}, Rule.STREAM_REREAD),
    ("-", {"verify": True}, Rule.STREAM_REREAD),
])
def test_download_rules(path, options, rule):
    assert download_conflict(path, **{**DOWNLOAD, **options}) is rule


def test_copies_refuse_before_any_request():
    """No server listens at the URL: the refusal comes first."""
    url = "https://127.0.0.1:9/images/none"
    with pytest.raises(OptionConflict) as e:
        client.upload("-", url, format="qcow2")
    assert e.value.rule is Rule.STREAM_UPLOAD_FORMAT
    assert isinstance(e.value, ValueError)
    with pytest.raises(OptionConflict) as e:
        client.download(url, "-", resume=True)
    assert e.value.rule is Rule.STREAM_REREAD
