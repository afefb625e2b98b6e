"""A row's blob in format ``aquapeer-bundle/1``: the reference encoding (pure).

The blob is the row as a JSON object, column name -> the column's text,
NULL columns left out, exactly as PostgreSQL prints
``jsonb_strip_nulls(jsonb_build_object(col, col::text, ...))::text`` (see
docs/bundles.md, "A column's text").  The server computes it in C
(``bundle._blob``, src/rowcodec.c); this module says what those bytes are,
so that the C can be tested against it.
"""

from collections.abc import Mapping

# PostgreSQL's escape_json: these five by name, other bytes below 0x20 as \u00xx, the rest as is.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES.update({chr(c): f"\\u{c:04x}" for c in range(0x20) if chr(c) not in _ESCAPES})
_TRANSLATION = str.maketrans(_ESCAPES)


def json_string(text: str) -> str:
    """``text`` as a JSON string, escaped as PostgreSQL escapes it."""
    return '"' + text.translate(_TRANSLATION) + '"'


def jsonb_key_order(name: str) -> tuple[int, bytes]:
    """jsonb orders an object's keys by their length in bytes, then bytewise."""
    encoded = name.encode()
    return len(encoded), encoded


def blob(columns: Mapping[str, str | None]) -> str:
    """The blob of a row given as column name -> the column's text (None for NULL)."""
    return "{" + ", ".join(f"{json_string(name)}: {json_string(columns[name])}"
                           for name in sorted(columns, key=jsonb_key_order)
                           if columns[name] is not None) + "}"
