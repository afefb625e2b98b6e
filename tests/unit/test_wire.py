"""The data-channel frames: validation, fragments, protocol versions, rate limits, bundle answers
(no server)."""

import hashlib
import os
import random
import zlib

import msgpack
import pytest
import zstandard

from aquapeer.bundles import store as bundle_store
from aquapeer.errors import AquapeerError
from aquapeer.net import wire

UID = bytes(range(16))
GOOD = [
    {"t": "hello", "sig": b"s" * 64, "proto": [1, 1], "max_message_bytes": 16 << 20},
    {"t": "verified"},
    {"t": "ping", "at": 1.5, "rtt": None},
    {"t": "ping", "at": 1.5, "rtt": 2.25},
    {"t": "pong", "at": None},
    {"t": "bye"},
    {"t": "msgs", "epoch": UID, "prev": None, "items": [[1, UID, "chat", 1.0, '{"a": 1}']]},
    {"t": "msgs", "epoch": UID, "prev": 7, "items": [[8, UID, "chat", 1, "null"], [9, UID, "x", 2.0, "1"]]},
    {"t": "ack", "epoch": UID, "upto": 9, "rejected": [[8, "topic not allowed"]]},
    {"t": "call", "id": UID, "fn": "public.price", "arg": "{}", "timeout_ms": 1000},
    {"t": "result", "id": UID, "ok": True, "result": "{}", "error": None},
    {"t": "result", "id": UID, "ok": False, "result": None, "error": {"message": "boom", "sqlstate": "22012"}},
    {"t": "cancel", "id": UID},
    {"t": "bundle_get", "id": UID, "bundle": "shop", "want": "objects", "ids": [bytes(32)]},
    {"t": "bundle_get", "id": UID, "bundle": "shop", "want": "slice", "ids": [bytes(32)], "offset": 4 << 20},
    {"t": "bundle_get", "id": UID, "bundle": "shop", "want": "objects", "ids": [bytes(32)], "blobs": True},
    {"t": "presence", "status": "reviewing widget"},
    {"t": "presence", "status": None},
    {"t": "locks", "sync": True, "done": True, "set": [], "drop": []},
    {"t": "locks", "sync": False, "done": False, "drop": [UID],
     "set": [[UID, "public.widget", ["42"], "fixing a typo", 30.0, None],
             [UID, '"My Schema"."t"', None, None, 30, 12.5]]},
]


@pytest.mark.parametrize("frame", GOOD, ids=lambda f: f["t"])
def test_good_frames_round_trip(frame):
    (data,) = wire.encode(frame)
    assert wire.decode(data) == frame


BAD = [
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"t": "launch"}), "unknown frame type"),
    (msgpack.packb({"x": 1}), "unknown frame type"),
    (msgpack.packb({"t": "ping"}), "invalid 'at'"),
    (msgpack.packb({"t": "ping", "at": True, "rtt": None}), "invalid 'at'"),
    (msgpack.packb({"t": "ping", "at": float("nan"), "rtt": None}), "invalid 'at'"),
    (msgpack.packb({"t": "msgs", "epoch": b"short", "prev": None, "items": []}), "invalid 'epoch'"),
    (msgpack.packb({"t": "msgs", "epoch": UID, "prev": None, "items": []}, use_bin_type=True), "invalid 'items'"),
    (msgpack.packb({"t": "msgs", "epoch": UID, "prev": 0, "items": [[1, UID, "t", 1.0, "1"]]}, use_bin_type=True),
     "invalid 'prev'"),
    (msgpack.packb({"t": "msgs", "epoch": UID, "prev": None, "items": [[0, UID, "t", 1.0, "1"]]}, use_bin_type=True),
     "invalid 'items'"),
    (msgpack.packb({"t": "msgs", "epoch": UID, "prev": None, "items": [[1, UID, "", 1.0, "1"]]}, use_bin_type=True),
     "invalid 'items'"),
    (msgpack.packb({"t": "msgs", "epoch": UID, "prev": None, "items": [[1, UID, "x" * 256, 1.0, "1"]]},
                   use_bin_type=True), "invalid 'items'"),
    (msgpack.packb({"t": "ack", "epoch": UID, "upto": -1, "rejected": []}, use_bin_type=True), "invalid 'upto'"),
    (msgpack.packb({"t": "call", "id": UID, "fn": "", "arg": "{}", "timeout_ms": 5}, use_bin_type=True),
     "invalid 'fn'"),
    (msgpack.packb({"t": "call", "id": UID, "fn": "f", "arg": "{}", "timeout_ms": 0}, use_bin_type=True),
     "invalid 'timeout_ms'"),
    (msgpack.packb({"t": "hello", "sig": b"s", "proto": [2, 1], "max_message_bytes": 4096}, use_bin_type=True),
     "invalid 'proto'"),
    (msgpack.packb({"t": "frag", "more": True, "data": b"x" * (wire.FRAGMENT_BYTES + 1)}, use_bin_type=True),
     "invalid 'data'"),
    (msgpack.packb({"t": "bundle_get", "id": UID, "bundle": "shop", "want": "slice", "ids": [bytes(32)],
                    "offset": -1}, use_bin_type=True), "invalid 'offset'"),
    (msgpack.packb({"t": "bundle_get", "id": UID, "bundle": "shop", "want": "slice", "ids": [bytes(32)],
                    "offset": wire.LARGEST_OBJECT}, use_bin_type=True), "invalid 'offset'"),
    (msgpack.packb({"t": "bundle_get", "id": UID, "bundle": "shop", "want": "objects", "ids": [bytes(32)],
                    "blobs": 1}, use_bin_type=True), "invalid 'blobs'"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_bad_frames_are_refused_with_a_reason(data, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode(data)


def test_a_message_larger_than_a_fragment_is_refused_unless_reassembled():
    frame = {"t": "call", "id": UID, "fn": "f", "arg": "x" * wire.MAX_PACKET, "timeout_ms": 10}
    data = msgpack.packb(frame, use_bin_type=True)
    with pytest.raises(wire.WireError, match="over the"):
        wire.decode(data)
    assert wire.decode(data, limit=None) == frame


def test_random_and_truncated_bytes_never_escape_as_other_errors():
    rng = random.Random(4)
    samples = [os.urandom(rng.randrange(0, 200)) for _ in range(3000)]
    for frame in GOOD:
        (data,) = wire.encode(frame)
        samples += [data[:n] for n in range(len(data))]
        samples += [bytes(b ^ (1 << rng.randrange(8)) if i == k else b for i, b in enumerate(data))
                    for k in range(len(data))]
    for data in samples:
        try:
            wire.decode(data)
        except wire.WireError:
            pass


def test_large_frames_travel_as_fragments_and_reassemble():
    frame = {"t": "call", "id": UID, "fn": "f", "arg": "x" * (3 * wire.FRAGMENT_BYTES), "timeout_ms": 10}
    packets = wire.encode(frame)
    assert len(packets) == 4 and all(len(p) <= wire.FRAGMENT_BYTES + 64 for p in packets)
    joiner = wire.Reassembler(limit=4 * wire.FRAGMENT_BYTES)
    pieces = [wire.decode(p) for p in packets]
    assert [p["more"] for p in pieces] == [True, True, True, False]
    assert [joiner.feed(p) for p in pieces[:-1]] == [None] * 3
    assert wire.decode(joiner.feed(pieces[-1]), limit=None) == frame


def test_reassembly_refuses_more_than_the_limit_and_starts_again():
    joiner = wire.Reassembler(limit=100)
    joiner.feed({"t": "frag", "more": True, "data": b"x" * 60})
    with pytest.raises(wire.WireError, match="larger than 100 bytes"):
        joiner.feed({"t": "frag", "more": True, "data": b"x" * 60})
    assert joiner.feed({"t": "frag", "more": False, "data": b"ok"}) == b"ok"


def test_protocol_negotiation_picks_the_highest_common_version():
    assert wire.negotiate([1, 1], mine=(1, 1)) == 1
    assert wire.negotiate([1, 5], mine=(1, 3)) == 3
    assert wire.negotiate([2, 9], mine=(1, 3)) == 3
    with pytest.raises(wire.WireError, match="no common protocol version: we speak 1-1, the friend 2-3"):
        wire.negotiate([2, 3], mine=(1, 1))


def test_rate_limit_allows_a_burst_then_the_rate():
    now = [0.0]
    limit = wire.RateLimit(rate=10, burst=5, clock=lambda: now[0])
    assert [limit.allow() for _ in range(6)] == [True] * 5 + [False]
    now[0] += 0.1
    assert limit.allow() and not limit.allow()
    now[0] += 100
    assert sum(limit.allow() for _ in range(20)) == 5


def test_lock_frames_are_bounded_and_checked():
    item = [UID, "public.widget", ["42"], None, 30.0, None]
    frame = {"t": "locks", "sync": False, "done": False, "set": [item], "drop": []}
    assert wire.validate(frame) == frame
    for bad in ([b"short", *item[1:]], [UID, "", *item[2:]], [*item[:2], [42], *item[3:]],
                [*item[:2], ["1"] * (wire.MAX_KEY_COLUMNS + 1), *item[3:]], [*item[:3], "n" * 1001, *item[4:]],
                [*item[:4], 0, None], [*item[:4], 30.0, -1.0], [*item[:4], float("inf"), None], item[:5]):
        with pytest.raises(wire.WireError, match="locks frame with a missing or invalid 'set'"):
            wire.validate({**frame, "set": [bad]})
    with pytest.raises(wire.WireError, match="invalid 'set'"):
        wire.validate({**frame, "set": [item] * (wire.MAX_LOCK_ITEMS + 1)})
    with pytest.raises(wire.WireError, match="invalid 'drop'"):
        wire.validate({**frame, "drop": [UID] * (wire.MAX_LOCK_ITEMS + 1)})
    with pytest.raises(wire.WireError, match="invalid 'status'"):
        wire.validate({"t": "presence", "status": "x" * (wire.MAX_STATUS + 1)})


def test_bundle_frames_are_checked_like_every_other():
    get = {"t": "bundle_get", "id": b"i" * 16, "bundle": "shop", "want": "objects", "ids": [b"x" * 32]}
    assert wire.decode(msgpack.packb(get, use_bin_type=True)) == get
    for field, bad in (("want", "everything"), ("ids", [b"short"]), ("bundle", ""), ("ids", [b"x" * 32] * 10001)):
        with pytest.raises(wire.WireError, match=f"bundle_get frame with a missing or invalid '{field}'"):
            wire.validate({**get, field: bad})
    data = {"t": "bundle_data", "id": b"i" * 16, "ok": True, "data": wire.pack_body([1, "two"], wire.PROTOCOL_MAX),
            "error": None}
    assert wire.unpack_body(wire.validate(data)["data"], 1000) == [1, "two"]


@pytest.mark.parametrize("protocol", [wire.ZSTD_BODIES_PROTOCOL - 1, wire.ZSTD_BODIES_PROTOCOL])
def test_a_bundle_body_may_not_inflate_beyond_the_limit(protocol):
    body = wire.pack_body("x" * 100_000, protocol)
    assert len(body) < 1000  # compressed
    assert wire.unpack_body(body, 200_000) == "x" * 100_000
    with pytest.raises(wire.WireError, match="inflates beyond 50000 bytes"):
        wire.unpack_body(body, 50_000)
    with pytest.raises(wire.WireError, match="undecodable bundle_data body"):
        wire.unpack_body(b"not zlib", 1000)
    with pytest.raises(wire.WireError, match="cut short|undecodable bundle_data body"):
        wire.unpack_body(body[:-5], 200_000)


def test_bodies_are_zstd_from_protocol_6_and_zlib_for_a_friend_on_an_earlier_version():
    value = [b"aquapeer-bucket/1\n", [{"name": "widget " * 20, "n": n} for n in range(500)]]
    # The link speaks the highest version both sides do: a friend on 5 gets zlib.
    for friend, encoding in (([1, 5], "zlib"), ([1, 6], "zstd"), ([2, 9], "zstd")):
        body = wire.pack_body(value, wire.negotiate(friend))
        if encoding == "zlib":
            assert msgpack.unpackb(zlib.decompress(body), raw=False) == value
        else:
            assert body.startswith(wire.ZSTD_MAGIC)
            assert msgpack.unpackb(zstandard.ZstdDecompressor().decompress(body), raw=False) == value
        # The receiver tells the two apart by their first bytes.
        assert wire.unpack_body(body, wire.BODY_LIMIT) == value
    assert len(wire.pack_body(value, 6)) < len(wire.pack_body(value, 5))


def test_a_zstd_body_is_not_inflated_beyond_the_limit_whatever_its_header_says():
    packed = msgpack.packb("y" * 100_000)
    # zstandard allocates the size a frame declares, so one declaring more than the limit is
    # refused before it is inflated...
    with pytest.raises(wire.WireError, match="inflates beyond 50000 bytes"):
        wire.unpack_body(zstandard.ZstdCompressor().compress(packed), 50_000)
    # ...and one declaring no size inflates only up to the limit.
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(packed)
    assert wire.unpack_body(undeclared, 200_000) == "y" * 100_000
    with pytest.raises(wire.WireError, match="undecodable bundle_data body"):
        wire.unpack_body(undeclared, 50_000)
    with pytest.raises(wire.WireError, match="undecodable bundle_data body"):
        wire.unpack_body(wire.ZSTD_MAGIC + b"not zstd", 1000)


def test_objects_answers_go_by_position_from_protocol_3_and_in_pairs_before():
    objects = [b"aquapeer-fan/1\n", b'{"id": "1"}']
    ids = [hashlib.sha256(o).hexdigest() for o in objects]
    lacking = "0" * 64
    asked = [ids[0], lacking, ids[1], "f" * 64, "e" * 64]
    # Protocol 3: the i-th item is the i-th object asked for, nil where the friend lacks it, and the
    # answer may stop short (the rest is asked for again).
    bare = wire.unpack_body(wire.pack_body([objects[0], None, objects[1]], 3), wire.BODY_LIMIT)
    assert bundle_store._objects(bare, asked, bare=True) == (ids, objects, [])
    # Protocol 4: the size of an object too large for an answer, to be fetched in slices.
    sized = wire.unpack_body(wire.pack_body([objects[0], None, objects[1], 5 << 20], 4), wire.BODY_LIMIT)
    assert bundle_store._objects(sized, asked, bare=True) == (ids, objects, [("f" * 64, 5 << 20)])
    # Protocol 2: [id, bytes] pairs, the ids as sent (a wrong one is refused when kept).
    pairs = wire.unpack_body(wire.pack_body([[bytes.fromhex(i), o] for i, o in zip(ids, objects, strict=True)], 2),
                             wire.BODY_LIMIT)
    assert bundle_store._objects(pairs, asked, bare=False) == (ids, objects, [])
    for body, bare_form in ((pairs, True), (objects * 3, True), (objects, False), ("x", True),
                            ([[b"short", b"x"]], False), ([0], True), ([True], True), ([-4], True)):
        with pytest.raises(wire.WireError, match="an objects answer is a list of"):
            bundle_store._objects(body, asked, bare=bare_form)


class FriendsStore:
    """Stands in for the adapter bundle_store.serve reads a friend's objects through.  (How many
    commits an answer holds is counted in SQL: test_commits_come_in_pages_when_one_answer_cannot_hold_them.)"""

    def __init__(self, objects):
        self.objects = {hashlib.sha256(o).hexdigest(): o for o in objects}

    def query(self, sql, args):
        assert "_serve_bundle_objects" in sql
        return [{"id": i, "data": self.objects[i]} for i in sorted(args[3]) if i in self.objects]


def test_objects_answers_list_large_objects_by_size_from_protocol_4_and_refuse_them_clearly_before():
    small, large = b"s" * 100, b"L" * 5000
    store = FriendsStore([small, large])
    ids = [hashlib.sha256(o).digest() for o in (small, large)]

    def serve(protocol, asked=ids):
        return wire.unpack_body(bundle_store.serve(store, {
            "bundle": "b", "friend": "f", "granted": False, "want": "objects", "ids": asked, "limit": 1000,
            "protocol": protocol, "offset": 0, "starts": None}), wire.BODY_LIMIT)

    # Protocol 4: an object larger than an answer is listed by its size, to be fetched in slices.
    assert serve(4) == [small, len(large)]
    # Protocol 3: the answer stops before the large object, which alone is refused with a reason
    # (an answer the friend would refuse would leave it waiting).
    assert serve(3) == [small]
    with pytest.raises(AquapeerError, match=r"is 5000 bytes, more than one answer to you may hold \(1000\)") as e:
        serve(3, ids[1:])
    assert e.value.sqlstate == "54000"


def bucket(*blobs):
    """A bucket naming blobs (key hashes made up: bundle_store._bucket_blob_ids reads only the blob ids)."""
    return bundle_store.BUCKET_HEADER + b"".join(
        b"%04x%s %s\n" % (n, b"0" * 60, hashlib.sha256(b).hexdigest().encode()) for n, b in enumerate(blobs))


def test_from_protocol_5_a_clones_buckets_come_with_their_blobs_as_many_as_an_answer_holds():
    blobs = [b'{"id": "%d", "name": "%s"}' % (n, b"x" * 90) for n in range(6)]
    first, second, fan = bucket(*blobs[:3]), bucket(*blobs[3:]), b"aquapeer-fan/1\n"
    store = FriendsStore([first, second, fan, *blobs])
    ids = [hashlib.sha256(o).digest() for o in (fan, first, second)]

    def serve(limit, protocol=5, asked=ids):
        return wire.unpack_body(bundle_store.serve(store, {
            "bundle": "b", "friend": "f", "granted": False, "want": "objects", "ids": asked, "limit": limit,
            "protocol": protocol, "offset": 0, "starts": None, "blobs": True}), wire.BODY_LIMIT)

    # Each bucket with its blobs in the order of its lines; nil for what is not a bucket.
    assert serve(10_000) == [[fan, first, second], [None, blobs[:3], blobs[3:]]]
    # An answer stops before a bucket whose blobs would not fit (the asker asks again).
    assert serve(len(fan) + len(first) + 3 * len(blobs[0]) + 10) == [[fan, first], [None, blobs[:3]]]
    # A bucket that would not fit in an answer with its blobs comes without them: they are asked
    # for by id (and in slices if need be).
    assert serve(len(first) + 10, asked=ids[1:2]) == [[first], [None]]
    # Before protocol 5 the answer is what protocol 4 gives.
    assert serve(10_000, protocol=4) == [fan, first, second]

    # The asker takes the blobs' ids from their bucket (bundle._keep checks each against its bytes).
    answer = serve(10_000)
    assert bundle_store._carried_blobs(*answer) == ([hashlib.sha256(b).hexdigest() for b in blobs], blobs)
    for objects, carried in (([first], [blobs[:2]]), ([fan], [[blobs[0]]]), ([first], [blobs[:3], None]),
                             ([first], [[*blobs[:2], 7]]), ([first], "x")):
        with pytest.raises(wire.WireError, match="an objects answer with blobs"):
            bundle_store._carried_blobs(objects, carried)
