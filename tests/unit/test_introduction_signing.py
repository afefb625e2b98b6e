"""Introductions: signed by the introducer, for one recipient, checked against the introducer's chain."""

import base64

import msgpack
import pytest

from aquapeer import identity, introductions

HUB, BOB, CAROL = (identity.Identity.generate() for _ in range(3))


def introduce_carol_to_bob(introducer=HUB, note="met at the conference"):
    return introductions.make(introducer, BOB.peer_id, CAROL.chain, ["wss://signal.example.org"], "carol",
                              "The Hub", note)


def reason(payload, introducer_chain=HUB.chain, me=BOB.peer_id):
    with pytest.raises(identity.IdentityError) as e:
        introductions.open_(payload, introducer_chain, me)
    return e.value.reason


def test_roundtrip_carries_what_an_invite_carries():
    intro = introductions.open_(introduce_carol_to_bob(), HUB.chain, BOB.peer_id)
    assert intro.peer_id == CAROL.peer_id and intro.chain == CAROL.chain
    assert intro.signal_urls == ["wss://signal.example.org"]
    assert (intro.introduced_as, intro.introducer_name, intro.note) == ("carol", "The Hub", "met at the conference")


def test_meant_for_one_recipient_only():
    assert reason(introduce_carol_to_bob(), me=CAROL.peer_id) == "recipient"


def test_tampered_body_or_signature_fails():
    payload = introduce_carol_to_bob()
    body = msgpack.unpackb(base64.b64decode(payload["introduction"]), raw=False)
    body["note"] = "trust me"
    forged = dict(payload, introduction=base64.b64encode(msgpack.packb(body, use_bin_type=True)).decode())
    assert reason(forged) == "signature"
    sig = bytearray(base64.b64decode(payload["sig"]))
    sig[0] ^= 1
    assert reason(dict(payload, sig=base64.b64encode(bytes(sig)).decode())) == "signature"


def test_signed_by_someone_else_fails():
    assert reason(introduce_carol_to_bob(introducer=CAROL)) == "signature"


def test_key_rotated_after_signing_still_verifies():
    payload = introduce_carol_to_bob()
    rotated = HUB.rotate()
    assert introductions.open_(payload, rotated.chain, BOB.peer_id).peer_id == CAROL.peer_id
    # signed with the new key, checked against the old chain we still hold
    assert reason(introduce_carol_to_bob(introducer=rotated)) == "signature"


def test_damaged_payloads_are_refused_with_a_reason():
    assert reason({"v": 1, "introduction": "%%%", "sig": ""}) == "malformed"
    assert reason("not a dict") == "malformed"
    assert reason({"v": 9}) == "version"
    payload = introduce_carol_to_bob()
    body = msgpack.unpackb(base64.b64decode(payload["introduction"]), raw=False)
    body["chain"] = CAROL.chain.to_wire()[:0]
    resigned = msgpack.packb(body, use_bin_type=True)
    bad_chain = {"v": 1, "introduction": base64.b64encode(resigned).decode(),
                 "sig": base64.b64encode(HUB.sign(introductions.DOMAIN + resigned)).decode()}
    assert reason(bad_chain) == "chain"


def test_a_friend_is_not_introduced_to_itself_and_notes_are_bounded():
    with pytest.raises(identity.IdentityError):
        introductions.make(HUB, CAROL.peer_id, CAROL.chain, [], "carol", None, None)
    with pytest.raises(identity.IdentityError):
        introduce_carol_to_bob(note="x" * (introductions.MAX_NOTE_CHARS + 1))
