"""Small JSON request bodies and JSON responses."""

import json

from diskferry.errors import BadRequest, PayloadTooLarge

#: Largest JSON body accepted (tickets, PATCH). A ticket is a few hundred
#: bytes; 64 KiB leaves room for long URLs and file names.
MAX_JSON_BODY = 64 * 1024


def read_json(request):
    length = request.head.content_length
    if length is None:
        raise BadRequest("Content-Length header is required")
    if length > MAX_JSON_BODY:
        raise PayloadTooLarge(
            f"JSON body of {length} bytes is larger than {MAX_JSON_BODY}")
    data = request.conn.read_body(MAX_JSON_BODY)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"Invalid JSON body: {e}") from None


def send_json(request, obj, status=200, headers=None):
    body = json.dumps(obj).encode("utf-8")
    request.conn.send_response(status, body, content_type="application/json",
                               headers=headers)


def field(obj, name, kind, default=None, required=False, minimum=None):
    """A field of a JSON object, 400 naming it if missing or ill-typed."""
    if name not in obj:
        if required:
            raise BadRequest(f"Missing required field {name!r}")
        return default
    value = obj[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and
                                       kind is not bool):
        raise BadRequest(f"Invalid field {name!r}: expected "
                         f"{kind.__name__}, got {value!r:.60}")
    if minimum is not None and value < minimum:
        raise BadRequest(f"Invalid field {name!r}: must be >= {minimum}")
    return value
