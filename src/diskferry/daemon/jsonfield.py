"""Fields of a JSON object a client sent: present, of their type, in range.

A bad field is a 400 that names it, so the sender learns what to fix.
Tickets and request bodies (PATCH, a ticket's PATCH) are checked by the
same code and word their errors each their own way (``FieldErrors``),
as they always have: "Invalid ticket field 'size'" against "Invalid field
'size'". Pure: no HTTP, so the ticket store and the handlers both use it.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, overload

from diskferry.errors import BadRequest

T = TypeVar("T")


@dataclass(frozen=True)
class FieldErrors:
    """How the errors about one kind of JSON object read."""

    #: What a field is called: "field", "ticket field".
    noun: str
    #: Characters of a value of the wrong type quoted in the message.
    shown: int
    #: Characters of an out-of-range value quoted; 0 quotes none.
    shown_out_of_range: int


#: Fields of a request body (PATCH of an image or a ticket).
REQUEST_FIELDS = FieldErrors("field", shown=60, shown_out_of_range=0)

#: Fields of a ticket being installed.
TICKET_FIELDS = FieldErrors("ticket field", shown=100, shown_out_of_range=40)


@overload
def field(obj: Mapping[str, object], name: str, kind: type[T], default: T,
          required: bool = False, minimum: int | None = None,
          maximum: int | None = None,
          errors: FieldErrors = REQUEST_FIELDS) -> T: ...


@overload
def field(obj: Mapping[str, object], name: str, kind: type[T],
          default: None = None, *, required: Literal[True],
          minimum: int | None = None, maximum: int | None = None,
          errors: FieldErrors = REQUEST_FIELDS) -> T: ...


@overload
def field(obj: Mapping[str, object], name: str, kind: type[T],
          default: None = None, required: Literal[False] = False,
          minimum: int | None = None, maximum: int | None = None,
          errors: FieldErrors = REQUEST_FIELDS) -> T | None: ...


def field(obj: Mapping[str, object], name: str, kind: type[T],
          default: T | None = None, required: bool = False,
          minimum: int | None = None, maximum: int | None = None,
          errors: FieldErrors = REQUEST_FIELDS) -> T | None:
    """``obj[name]``, or ``default`` when absent and not ``required``;
    BadRequest naming the field if missing, ill-typed or out of range
    (``minimum`` and ``maximum`` apply to numbers)."""
    if name not in obj:
        if required:
            raise BadRequest(f"Missing required {errors.noun} {name!r}")
        return default
    value = obj[name]
    # bool is an int in Python, never in JSON.
    if not isinstance(value, kind) or (isinstance(value, bool) and
                                       kind is not bool):
        raise BadRequest(f"Invalid {errors.noun} {name!r}: expected "
                         f"{kind.__name__}, got {value!r:.{errors.shown}}")
    checked: T = value
    if isinstance(value, int | float):
        _check_range(name, value, minimum, maximum, errors)
    return checked


def _check_range(name: str, value: float, minimum: int | None,
                 maximum: int | None, errors: FieldErrors) -> None:
    if minimum is not None and value < minimum:
        bound = f">= {minimum}"
    elif maximum is not None and value > maximum:
        bound = f"<= {maximum}"
    else:
        return
    got = ""
    if errors.shown_out_of_range:
        got = f", got {value!r:.{errors.shown_out_of_range}}"
    raise BadRequest(f"Invalid {errors.noun} {name!r}: must be {bound}{got}")
