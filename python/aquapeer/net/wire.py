"""The frames two peers exchange on their data channel: msgpack maps with a type.

Every frame is validated here before anything else looks at it: a friend
may run other software, or misbehave.  A frame too large for one data
channel message travels as ``frag`` frames (all but the last with
``more``), reassembled up to the receiver's limit.

Protocol versions: each side sends the range it speaks in ``hello``; the
link speaks the highest version both do.

Version 1 frames (``t`` is the type):

=========  ================================================================
hello      sig (bytes), proto [min, max], max_message_bytes: proof of key
verified   the friend's proof was accepted
ping/pong  at (float), and in ping rtt (the offerer's last round trip, ms, or nil):
           liveness and round-trip time; only the offerer pings
bye        hanging up
frag       more (bool), data (bytes): a piece of a larger frame
msgs       epoch (16 bytes), prev (int or nil), items [[seq, id (16 bytes),
           topic, sent_at (float), payload (JSON text)], ...]
ack        epoch, upto (int), rejected [[seq, reason], ...]
call       id (16 bytes), fn (str), arg (JSON text), timeout_ms (int)
result     id, ok (bool), result (JSON text or nil), error {message, sqlstate} or nil
cancel     id
=========  ================================================================

Version 2 adds bundle transfers (a link of version 1 refuses them):

===========  ==============================================================
bundle_get   id (16 bytes), bundle, want ("head", "commits" or "objects"),
             ids [32-byte ids]: for commits those the asker has, for
             objects those it wants
bundle_push  id, bundle, head (32-byte id): take my commits up to head
bundle_data  id, ok, data (compressed msgpack, see pack_body) or nil,
             error {message, sqlstate} or nil
===========  ==============================================================

Version 3 answers ``bundle_get`` for objects by position instead of with
``[id, bytes]`` pairs: the i-th item is the bytes of the i-th id asked for, nil
for one the sender lacks, and the answer may end before the list does (the
asker asks again for the rest).  The ids, 32 random bytes each, neither
compress nor let the compressor match across objects: a clone's answers
shrink by a fifth.

Version 4 carries what is larger than one answer may be:

- in place of the bytes of such an object, an objects answer has its size (an
  int), and the asker fetches it with ``bundle_get`` want "slice", ids [its id]
  and offset (int): each answer is the bytes from offset on, as many as one
  answer may hold;
- a commits answer holds the commits newest first, as many as one answer may
  hold, and the asker asks again with from [the parents it still lacks]: the
  commits reachable from those instead of from the head.

Version 5 lets a clone fetch a bucket's blobs with the bucket: with blobs
(true), an objects answer is [objects, blobs], where objects is the answer
version 4 would give and blobs has, for each of them, the bytes of every blob
a bucket names in the order of its lines, or nil (not a bucket, or blobs the
asker must ask for by id: too large, or missing).  The asker names no blob it
does not know to lack, and keeps each bucket with its blobs in one step.

Version 6 compresses ``bundle_data`` bodies with zstd instead of zlib: a
seventh fewer bytes on the wire, compressed in a fifth of zlib's CPU time and
inflated in a third.  A friend on an earlier version still gets zlib.  A
receiver tells the two apart by the zstd frame's magic number, which no zlib
stream starts with.

Version 8 adds presence and soft locks (docs/presence.md):

=========  ================================================================
presence   status (str or nil): what the sender says it is doing
locks      sync (bool), done (bool), set [[id (16 bytes), relation (str),
           key ([str, ...] or nil), note (str or nil), ttl_s (float),
           remaining_s (float or nil)], ...], drop [ids]: soft locks the
           sender took or changed, and those it released.  A sync replaces
           what the receiver had of the sender's locks with those sent from
           the frame with sync to the frame with done.
=========  ================================================================
"""

import functools
import math
import time
import zlib

import msgpack
import zstandard

from ..errors import AquapeerError

PROTOCOL_MIN, PROTOCOL_MAX = 1, 8
BUNDLES_PROTOCOL = 2
BARE_OBJECTS_PROTOCOL = 3  # objects answered by position, without their ids
LARGE_TRANSFERS_PROTOCOL = 4  # objects larger than an answer in slices, commits in pages
BUCKET_BLOBS_PROTOCOL = 5  # a bucket's blobs with the bucket
ZSTD_BODIES_PROTOCOL = 6  # bundle_data bodies in zstd, not zlib
FORMAT2_PROTOCOL = 7  # bundles of object format aquapeer-bundle/2 (rows inside their buckets)
PRESENCE_PROTOCOL = 8  # presence and soft locks
# The largest object a transfer carries in slices: it is put together in the network worker's
# memory and handed to an executor in one control frame.
LARGEST_OBJECT = 100 * 1024 * 1024
# Under 64 KiB, the smallest message a data channel must accept (RFC 8841).
FRAGMENT_BYTES = 60 * 1024
# The largest data-channel message a peer sends: a fragment and its framing.
MAX_PACKET = FRAGMENT_BYTES + 1024
MAX_TOPIC = 255
MAX_NAME = 255
MAX_REASON = 1000
MAX_ITEMS = 10000
BUNDLE_WANTS = ("head", "commits", "objects", "slice")
MAX_LOCK_ITEMS = 1000  # soft locks a locks frame takes or drops
MAX_STATUS = 200
MAX_NOTE = 1000
MAX_KEY_COLUMNS = 32  # PostgreSQL's INDEX_MAX_KEYS


class WireError(AquapeerError):
    sqlstate = "08P01"  # protocol_violation


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _uid(v):
    return isinstance(v, bytes) and len(v) == 16


def _text(limit):
    # PostgreSQL text cannot hold NUL.
    return lambda v: isinstance(v, str) and len(v) <= limit and "\x00" not in v


def _opt(check):
    return lambda v: v is None or check(v)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _timestamp(v):
    return _number(v) and 0 <= v < 2 ** 37  # seconds since 1970, as PostgreSQL can hold them


def _seq(v):
    return _is_int(v) and 0 < v < 2 ** 63


def _proto_range(v):
    return (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and 0 < x < 2 ** 16 for x in v)
            and v[0] <= v[1])


def _msg_item(v):
    return (isinstance(v, list) and len(v) == 5 and _seq(v[0]) and _uid(v[1]) and _text(MAX_TOPIC)(v[2])
            and v[2] != "" and _timestamp(v[3]) and isinstance(v[4], str))


def _rejection(v):
    return isinstance(v, list) and len(v) == 2 and _seq(v[0]) and _text(MAX_REASON)(v[1])


def _object_id(v):
    return isinstance(v, bytes) and len(v) == 32


def _bundle_name(v):
    return _text(63)(v) and v != ""


def _list_of(check, limit=MAX_ITEMS):
    return lambda v: isinstance(v, list) and len(v) <= limit and all(check(x) for x in v)


def _error(v):
    return (isinstance(v, dict) and _text(MAX_REASON * 8)(v.get("message"))
            and _text(5)(v.get("sqlstate")))


def _lock_item(v):
    return (isinstance(v, list) and len(v) == 6 and _uid(v[0]) and _text(2 * MAX_NAME + 5)(v[1]) and v[1] != ""
            and _opt(_list_of(_text(MAX_REASON), MAX_KEY_COLUMNS))(v[2]) and _opt(_text(MAX_NOTE))(v[3])
            and _number(v[4]) and 0 < v[4] <= 366 * 86400 and _opt(lambda r: _number(r) and r >= 0)(v[5]))


# type -> {field: check}; every field is required (nil where _opt allows).
SCHEMAS = {
    "hello": {"sig": lambda v: isinstance(v, bytes) and len(v) <= 1024, "proto": _proto_range,
              "max_message_bytes": lambda v: _is_int(v) and 1024 <= v <= 2 ** 31},
    "verified": {},
    "ping": {"at": _number, "rtt": _opt(_number)},
    "pong": {"at": _opt(_number)},
    "bye": {},
    "frag": {"more": lambda v: isinstance(v, bool),
             "data": lambda v: isinstance(v, bytes) and 0 < len(v) <= FRAGMENT_BYTES},
    "msgs": {"epoch": _uid, "prev": _opt(_seq), "items": lambda v: _list_of(_msg_item)(v) and len(v) > 0},
    "ack": {"epoch": _uid, "upto": lambda v: _is_int(v) and 0 <= v < 2 ** 63, "rejected": _list_of(_rejection)},
    "call": {"id": _uid, "fn": lambda v: _text(MAX_NAME)(v) and v != "", "arg": lambda v: isinstance(v, str),
             "timeout_ms": lambda v: _is_int(v) and 0 < v <= 24 * 3600 * 1000},
    "result": {"id": _uid, "ok": lambda v: isinstance(v, bool), "result": _opt(lambda v: isinstance(v, str)),
               "error": _opt(_error)},
    "cancel": {"id": _uid},
    "bundle_get": {"id": _uid, "bundle": _bundle_name, "want": lambda v: v in BUNDLE_WANTS,
                   "ids": _list_of(_object_id)},
    "bundle_push": {"id": _uid, "bundle": _bundle_name, "head": _object_id},
    "bundle_data": {"id": _uid, "ok": lambda v: isinstance(v, bool), "data": _opt(lambda v: isinstance(v, bytes)),
                    "error": _opt(_error)},
    "presence": {"status": _opt(_text(MAX_STATUS))},
    "locks": {"sync": lambda v: isinstance(v, bool), "done": lambda v: isinstance(v, bool),
              "set": _list_of(_lock_item, MAX_LOCK_ITEMS), "drop": _list_of(_uid, MAX_LOCK_ITEMS)},
}

# Fields later versions added to a type, which earlier versions do not send.
OPTIONAL_FIELDS = {
    # version 4: where a slice starts, and where a walk for commits starts
    "bundle_get": {"offset": lambda v: _is_int(v) and 0 <= v < LARGEST_OBJECT,
                   "from": lambda v: _list_of(_object_id)(v) and len(v) > 0,
                   # version 5: buckets with their blobs
                   "blobs": lambda v: isinstance(v, bool)},
}


def validate(frame):
    """The frame if it is well formed, else WireError saying what is wrong."""
    if not isinstance(frame, dict):
        raise WireError("a frame is not a map")
    kind = frame.get("t")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise WireError(f"unknown frame type {str(kind)[:40]!r}")
    for field, check in schema.items():
        if field not in frame or not check(frame[field]):
            raise WireError(f"{kind} frame with a missing or invalid {field!r}")
    for field, check in OPTIONAL_FIELDS.get(kind, {}).items():
        if field in frame and not check(frame[field]):
            raise WireError(f"{kind} frame with an invalid {field!r}")
    return frame


def decode(data, limit=MAX_PACKET):
    """Bytes from the channel (or reassembled fragments: limit None) to a validated frame."""
    if isinstance(data, str):
        data = data.encode()
    if limit is not None and len(data) > limit:
        raise WireError(f"a frame of {len(data)} bytes, over the {limit} a peer may send at once")
    try:
        frame = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"undecodable frame ({type(e).__name__})") from None
    return validate(frame)


def encode(frame):
    """A frame as the data-channel messages to send: one, or its fragments."""
    data = msgpack.packb(frame, use_bin_type=True)
    if len(data) <= FRAGMENT_BYTES:
        return [data]
    pieces = range(0, len(data), FRAGMENT_BYTES)
    return [msgpack.packb({"t": "frag", "more": start + FRAGMENT_BYTES < len(data),
                           "data": data[start:start + FRAGMENT_BYTES]}, use_bin_type=True)
            for start in pieces]


class Reassembler:
    """Joins frag frames into the frame they carry, refusing anything over limit bytes."""

    def __init__(self, limit):
        self.limit = limit
        self.parts = []
        self.size = 0

    def feed(self, frag):
        """The whole frame's bytes when frag was its last piece, else None."""
        self.size += len(frag["data"])
        if self.size > self.limit:
            self.parts, self.size = [], 0
            raise WireError(f"a fragmented frame larger than {self.limit} bytes")
        self.parts.append(frag["data"])
        if frag["more"]:
            return None
        data, self.parts, self.size = b"".join(self.parts), [], 0
        return data


def negotiate(theirs, mine=(PROTOCOL_MIN, PROTOCOL_MAX)):
    """The highest protocol version both ranges include, else WireError."""
    version = min(mine[1], theirs[1])
    if version < max(mine[0], theirs[0]):
        raise WireError(f"no common protocol version: we speak {mine[0]}-{mine[1]}, "
                        f"the friend {theirs[0]}-{theirs[1]}")
    return version


class RateLimit:
    """A token bucket: rate per second, up to burst at once."""

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = float(burst), clock()

    def available(self):
        """What may be spent now."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens

    def allow(self, cost=1.0):
        if self.available() < cost:
            return False
        self.tokens -= cost
        return True


# --- bundle_data bodies ---------------------------------------------------------------------

# Levels measured on a clone's answers (3 MB of buckets and their rows each): zstd 1 shrinks them
# 3.4 times at 650 MB/s and inflates at 1.5 GB/s; zstd 3 compresses no smaller at half the speed,
# zlib 1 shrinks them 2.9 times at 140 MB/s.  The random hex ids of the rows bound every level.
ZSTD_LEVEL = 1
ZLIB_LEVEL = 1
BODY_LIMIT = 64 * 1024 * 1024  # what a body may inflate to
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@functools.cache
def _zstd_compressor():
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL)


def pack_body(value, protocol):
    """A bundle_data body for a link of this protocol version: msgpack, compressed (bundles are
    mostly text) with zstd from version 6, with zlib before."""
    raw = msgpack.packb(value, use_bin_type=True)
    if protocol >= ZSTD_BODIES_PROTOCOL:
        return _zstd_compressor().compress(raw)
    return zlib.compress(raw, ZLIB_LEVEL)


def _inflate_zstd(data, limit):
    # The size a frame declares is what zstandard allocates, whatever max_output_size says.
    declared = zstandard.frame_content_size(data)
    if declared > limit:
        raise WireError(f"a bundle_data body that inflates beyond {limit} bytes")
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)


def _inflate_zlib(data, limit):
    inflater = zlib.decompressobj()
    raw = inflater.decompress(data, limit)
    if inflater.unconsumed_tail or not inflater.eof:
        raise WireError(f"a bundle_data body that inflates beyond {limit} bytes, or is cut short")
    return raw


def unpack_body(data, limit):
    """A bundle_data body back (zstd or zlib, by its first bytes), refusing one that inflates
    beyond limit bytes."""
    try:
        raw = (_inflate_zstd if data.startswith(ZSTD_MAGIC) else _inflate_zlib)(data, limit)
        return msgpack.unpackb(raw, raw=False)
    except (zlib.error, zstandard.ZstdError, ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"an undecodable bundle_data body ({type(e).__name__})") from None
