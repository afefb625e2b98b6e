"""Buckets of object format 2 (pure): their rows, and whether a bucket received fits its place.

A bucket/2 is ``aquapeer-bucket/2\\n`` then one line ``<key hash> <row text>\\n`` per row, by
key hash (docs/bundles.md).  ``src/bucket.c`` is the same in C (bundle._bucket_lines,
bundle._bucket_misfit); tests/db/test_bucket_codec.py holds it to this module.
"""

HEADER = b"aquapeer-bucket/2\n"
KEY_HASH = 64
HEX = frozenset(b"0123456789abcdef")


class BucketError(ValueError):
    pass


def _lines(data):
    return [line for line in data[len(HEADER):].split(b"\n") if line]


def rows(data):
    """[(key hash, row text)] of a bucket/2's lines; [] for bytes that are not a bucket/2.
    BucketError for a line that is not a key hash, a space and a row, or bytes not UTF-8."""
    if not data.startswith(HEADER):
        return []
    try:
        data.decode()
    except UnicodeDecodeError as e:
        raise BucketError("a bucket is not UTF-8") from e
    out = []
    for line in _lines(data):
        if len(line) < KEY_HASH + 2 or line[KEY_HASH] != ord(" "):
            raise BucketError(f"a line of a bucket is not a key hash and a row: {line[:80]!r}")
        out.append((line[:KEY_HASH].decode(), line[KEY_HASH + 1:].decode()))
    return out


def misfit(data, path=None):
    """The first line of a bucket/2 that does not fit (its first 140 bytes, as text), or None.
    Each line must be a key hash (64 lower-case hex digits, starting with path where given),
    above the line before it, a space and a row (a JSON object's text); the bytes UTF-8."""
    if not data.startswith(HEADER):
        return "(not a bucket of format 2)"
    try:
        data.decode()
    except UnicodeDecodeError:
        return "(bytes that are not UTF-8)"
    before = b""
    for line in _lines(data):
        key = line[:KEY_HASH]
        if (len(line) < KEY_HASH + 2 or not set(key) <= HEX or line[KEY_HASH:KEY_HASH + 2] != b" {"
                or (path is not None and not key.startswith(path.encode())) or key <= before):
            return line[:140].decode(errors="ignore")  # (whole characters only)
        before = key
    return None
