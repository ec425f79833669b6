"""TOML text for a configuration: tables of strings, numbers and booleans.

The standard library reads TOML but does not write it. A configuration
holds only flat tables of scalars, which is all this writes; ``tomllib``
reads the result back to the same values (a test checks). Any other
type is refused, so that a new kind of option cannot be printed wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

Scalar = str | int | float | bool


def dumps(tables: Mapping[str, Mapping[str, Scalar]]) -> str:
    """``[section]`` tables in the order given, one ``key = value`` a line."""
    parts = []
    for name, values in tables.items():
        lines = [f"[{name}]"]
        lines += [f"{key} = {value_text(value)}"
                  for key, value in values.items()]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def value_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # inf, nan, 1e+20: TOML spells them alike
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"no TOML scalar for {value!r}")


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters
    (which TOML forbids raw, DEL included) escaped; the rest as is."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
