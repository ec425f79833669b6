"""The one check of JSON object fields, worded for request bodies and
for tickets."""

import pytest

from diskferry.daemon.jsonfield import REQUEST_FIELDS, TICKET_FIELDS, field
from diskferry.errors import BadRequest


@pytest.mark.parametrize("obj, kwargs, expected", [
    ({"n": 5}, {}, 5),
    ({}, {}, None),
    ({}, {"default": 7}, 7),
    ({"n": 0}, {"minimum": 0}, 0),
    ({"n": 9}, {"maximum": 9}, 9),
    ({"n": False}, {"kind": bool}, False),
    ({"n": "x"}, {"kind": str}, "x"),
    ({"n": ["a"]}, {"kind": list}, ["a"]),
])
def test_accepted(obj, kwargs, expected):
    kind = kwargs.pop("kind", int)
    assert field(obj, "n", kind, **kwargs) == expected


@pytest.mark.parametrize("obj, kwargs, request_message, ticket_message", [
    ({}, {"required": True},
     "Missing required field 'n'",
     "Missing required ticket field 'n'"),
    ({"n": "5"}, {},
     "Invalid field 'n': expected int, got '5'",
     "Invalid ticket field 'n': expected int, got '5'"),
    ({"n": True}, {},
     "Invalid field 'n': expected int, got True",
     "Invalid ticket field 'n': expected int, got True"),
    ({"n": 1.5}, {},
     "Invalid field 'n': expected int, got 1.5",
     "Invalid ticket field 'n': expected int, got 1.5"),
    ({"n": -1}, {"minimum": 0},
     "Invalid field 'n': must be >= 0",
     "Invalid ticket field 'n': must be >= 0, got -1"),
    ({"n": 11}, {"minimum": 0, "maximum": 10},
     "Invalid field 'n': must be <= 10",
     "Invalid ticket field 'n': must be <= 10, got 11"),
])
def test_refused(obj, kwargs, request_message, ticket_message):
    for errors, message in ((REQUEST_FIELDS, request_message),
                            (TICKET_FIELDS, ticket_message)):
        with pytest.raises(BadRequest) as e:
            field(obj, "n", int, errors=errors, **kwargs)
        assert str(e.value) == message


def test_bool_is_not_refused_as_bool():
    assert field({"b": True}, "b", bool) is True
    with pytest.raises(BadRequest, match="expected bool, got 1"):
        field({"b": 1}, "b", bool)


def test_long_values_are_cut_in_messages():
    value = "x" * 500
    with pytest.raises(BadRequest) as e:
        field({"n": value}, "n", int)
    assert str(e.value).endswith("got '" + "x" * 59)
    with pytest.raises(BadRequest) as e:
        field({"n": value}, "n", int, errors=TICKET_FIELDS)
    assert str(e.value).endswith("got '" + "x" * 99)
    big = 10 ** 60
    with pytest.raises(BadRequest) as e:
        field({"n": big}, "n", int, maximum=10, errors=TICKET_FIELDS)
    assert str(e.value).endswith("got " + str(big)[:40])
