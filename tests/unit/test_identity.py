"""Peer ids, key chains, invites, envelopes and DTLS binding (aquapeer.identity): pure and fast."""

import asyncio
import base64
import random

import msgpack
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from aquapeer import identity as I
from aquapeer.identity import IdentityError

# Device ids from Syncthing's own tests and docs: the same readable, checksummed form.
SYNCTHING_IDS = [
    "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2",
    "GYRZZQB-IRNPV4Z-T7TC52W-EQYJ3TT-FDQW6MW-DFLMU42-SSSU6EM-FBK2VAY",
    "LGFPDIT-7SKNNJL-VJZA4FC-7QNCRKA-CE753K7-2BW5QDK-2FOZ7FR-FEP57QJ",
]
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
T0 = 1_700_000_000.0


def raises(reason, fn, *args, match=None, **kw):
    with pytest.raises(IdentityError, match=match) as info:
        fn(*args, **kw)
    assert info.value.reason == reason, info.value.message
    assert info.value.sqlstate == "22023"
    return info.value


@pytest.fixture(scope="module")
def alice():
    return I.Identity.generate()


@pytest.fixture(scope="module")
def bob():
    return I.Identity.generate()


# --- peer ids ---------------------------------------------------------------

@pytest.mark.parametrize("text", SYNCTHING_IDS)
def test_syncthing_ids_check_like_ours(text):
    assert I.parse_peer_id(text) == text


def test_peer_id_shape_and_round_trip(alice):
    pid = alice.peer_id
    assert pid == I.peer_id_from_key(alice.chain.entries[0][0])
    groups = pid.split("-")
    assert len(groups) == 8 and all(len(g) == 7 for g in groups)
    assert set(pid.replace("-", "")) <= set(ALPHABET)
    plain = pid.replace("-", "")
    for variant in (pid, pid.lower(), plain, " ".join(plain[i:i + 4] for i in range(0, 56, 4)),
                    "  " + pid.lower().replace("-", " ") + "\n"):
        assert I.parse_peer_id(variant) == pid


def test_peer_id_accepts_digits_for_look_alike_letters():
    pid = SYNCTHING_IDS[0]  # has O, I and B
    assert I.parse_peer_id(pid.replace("O", "0").replace("I", "1").replace("B", "8")) == pid


def test_every_single_character_typo_is_caught(alice):
    # Doubling is a bijection mod 32, so Luhn mod 32 has no blind spot for substitutions.
    for pid in [alice.peer_id] + SYNCTHING_IDS:
        plain = pid.replace("-", "")
        for pos, ch in enumerate(plain):
            for other in ALPHABET.replace(ch, ""):
                typo = plain[:pos] + other + plain[pos + 1:]
                e = raises("typo", I.parse_peer_id, typo)
                assert f"check character of group {pos // 14 + 1} does not match" in e.message


def test_peer_id_wrong_length_and_characters(alice):
    raises("malformed", I.parse_peer_id, alice.peer_id[:-1], match="55 characters, not 56")
    raises("malformed", I.parse_peer_id, alice.peer_id + "A", match="57 characters")
    raises("malformed", I.parse_peer_id, "9" + alice.peer_id[1:], match="contains '9'")
    raises("malformed", I.parse_peer_id, None)
    raises("malformed", I.peer_id_from_key, b"short")


def test_peer_id_stable_across_rotation(alice):
    rotated = alice.rotate().rotate()
    assert rotated.peer_id == alice.peer_id
    assert rotated.chain.index == 2 and rotated.public_key != alice.public_key
    assert rotated.chain.extends(alice.chain) and not alice.chain.extends(rotated.chain)
    assert alice.chain.index == 0  # rotate() returns a new Identity


# --- key chains ---------------------------------------------------------------

def test_chain_wire_round_trip(alice):
    chain = alice.rotate().rotate().chain
    wire = msgpack.unpackb(msgpack.packb(chain.to_wire()), raw=False)
    again = I.KeyChain.from_wire(wire, expected_peer_id=alice.peer_id.lower())
    assert again == chain and again.peer_id == alice.peer_id and again.current_key == chain.current_key
    assert again.extends(chain) and chain.extends(again)


def test_chain_rejects_a_link_signed_by_the_wrong_key(alice, bob):
    chain = alice.rotate().chain
    new_key = chain.entries[1][0]
    forged = bob.sign(I.ROTATE_DOMAIN + alice.peer_id.encode() + (1).to_bytes(8, "big") + new_key)
    raises("broken", I.KeyChain.from_wire, [chain.to_wire()[0], [new_key, forged]],
           match="key 1 is not signed by key 0")


def test_chain_rejects_reordering(alice):
    wire = alice.rotate().rotate().chain.to_wire()
    raises("broken", I.KeyChain.from_wire, [wire[0], wire[2], wire[1]], match="broken")
    raises("malformed", I.KeyChain.from_wire, [wire[1], wire[0], wire[2]], match="first key carries a signature")
    # A link signed for another position does not verify at this one.
    raises("broken", I.KeyChain.from_wire, [wire[0], wire[1], wire[1]])


def test_chain_rejects_a_key_coming_back(alice):
    rotated = alice.rotate()
    back = rotated.sign(I.ROTATE_DOMAIN + alice.peer_id.encode() + (2).to_bytes(8, "big") + alice.public_key)
    raises("broken", I.KeyChain.from_wire, rotated.chain.to_wire() + [[alice.public_key, back]],
           match="appears twice")


def test_chain_rejects_structural_damage(alice):
    wire = alice.rotate().chain.to_wire()
    raises("malformed", I.KeyChain.from_wire, [[wire[0][0][:31], None], wire[1]], match="key 0 is not 32 bytes")
    raises("malformed", I.KeyChain.from_wire, [wire[0], [wire[1][0], wire[1][1][:63]]], match="not 64 bytes")
    raises("malformed", I.KeyChain.from_wire, [], match="no keys")
    raises("malformed", I.KeyChain.from_wire, None)
    raises("malformed", I.KeyChain.from_wire, [wire[0][0]])
    raises("sender", I.KeyChain.from_wire, wire, expected_peer_id=I.Identity.generate().peer_id)


def test_chain_cap(alice):
    me = alice
    for _ in range(I.MAX_CHAIN - 1):
        me = me.rotate()
    assert len(me.chain) == I.MAX_CHAIN
    raises("full", me.rotate, match="63 times")
    assert I.KeyChain.from_wire(me.chain.to_wire()) == me.chain
    raises("malformed", I.KeyChain.from_wire, me.chain.to_wire() + [[b"\1" * 32, b"\2" * 64]],
           match="more than 64")
    # The longest chain still makes an invite that parses.
    urls = [f"wss://signal-{i}.example.org:443/" + "p" * 400 for i in range(I.MAX_SIGNAL_URLS)]
    invite = I.make_invite(me, urls, "n" * I.MAX_NAME_CHARS)
    assert len(invite) <= I.MAX_INVITE_CHARS
    assert I.parse_invite(invite).chain == me.chain


# --- identities -------------------------------------------------------------

def test_secret_round_trip(alice):
    for me in (alice, alice.rotate()):
        again = I.Identity.from_secret(me.to_secret())
        assert again.peer_id == me.peer_id and again.chain == me.chain
        assert again.private_key == me.private_key and len(again.private_key) == 32
        assert I.verify(me.public_key, again.sign(b"x"), b"x")
    assert alice.private_key.hex() not in repr(alice)


def test_secret_with_mismatched_key_refused(alice, bob):
    blob = msgpack.packb({"v": 1, "key": bob.private_key, "chain": alice.chain.to_wire()})
    raises("mismatch", I.Identity.from_secret, blob, match="does not match")
    old_key = msgpack.packb({"v": 1, "key": alice.private_key, "chain": alice.rotate().chain.to_wire()})
    raises("mismatch", I.Identity.from_secret, old_key)
    raises("malformed", I.Identity.from_secret, alice.to_secret()[:-5], match="damaged")
    raises("malformed", I.Identity.from_secret, msgpack.packb({"v": 2}))


def test_verify(alice, bob):
    sig = alice.sign(b"data")
    assert I.verify(alice.public_key, sig, b"data")
    assert not I.verify(alice.public_key, sig, b"datA")
    assert not I.verify(bob.public_key, sig, b"data")
    assert not I.verify(b"short", sig, b"data")
    assert not I.verify(alice.public_key, sig[:10], b"data")


# --- invites ----------------------------------------------------------------

URLS = ["wss://signal.example.org", "ws://10.0.0.5:8765/aquapeer"]


def test_invite_round_trip(alice):
    text = I.make_invite(alice, URLS, "alice's db")
    assert "\n" not in text and text.startswith("aquapeer-invite:1:")
    assert alice.private_key not in base64.urlsafe_b64decode(text.split(":")[2] + "==")
    inv = I.parse_invite(text)
    assert (inv.peer_id, inv.chain, inv.signal_urls, inv.name_hint) == (alice.peer_id, alice.chain, URLS,
                                                                        "alice's db")
    # Chat apps wrap and indent.
    wrapped = "  " + "\n".join(text[i:i + 40] for i in range(0, len(text), 40)) + " \n"
    assert I.parse_invite(wrapped) == inv
    assert I.parse_invite(I.make_invite(alice, URLS)).name_hint is None
    rotated = alice.rotate()
    assert I.parse_invite(I.make_invite(rotated, URLS)).chain == rotated.chain


def _payload(text):
    body = text.split(":", 2)[2]
    return msgpack.unpackb(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)), raw=False)


def _flip_char_inside(text, raw, start, end):
    """Change one base64 character that encodes only bytes inside raw[start:end]."""
    prefix, body = text.rsplit(":", 1)
    pos = ((start + end) // 2) * 8 // 6 + 1
    assert start <= pos * 6 // 8 and (pos * 6 + 5) // 8 < end
    new = "A" if body[pos] != "A" else "B"
    return f"{prefix}:{body[:pos]}{new}{body[pos + 1:]}"


def test_invite_flipped_byte_in_signature_or_key_is_tampering(alice):
    text = I.make_invite(alice, URLS, "alice")
    body = text.rsplit(":", 1)[1]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    payload = _payload(text)
    sig_at = raw.index(payload["sig"])
    key_at = raw.index(payload["chain"][0][0])
    raises("tampered", I.parse_invite, _flip_char_inside(text, raw, sig_at, sig_at + 64), match="tampered")
    raises("tampered", I.parse_invite, _flip_char_inside(text, raw, key_at, key_at + 32), match="tampered")


def test_invite_every_single_character_change_is_refused(alice):
    text = I.make_invite(alice, URLS, "alice")
    head, body = text.rsplit(":", 1)
    rng = random.Random(7)
    for pos in range(len(body)):
        other = rng.choice([c for c in ALPHABET.lower() + ALPHABET + "-_" if c != body[pos]])
        e = raises_any(I.parse_invite, f"{head}:{body[:pos]}{other}{body[pos + 1:]}")
        assert e.reason in ("tampered", "damaged", "url", "name"), (pos, e.message)
    # ... and the plain middle one, for the record.
    mid = len(body) // 2
    e = raises_any(I.parse_invite, f"{head}:{body[:mid]}{'A' if body[mid] != 'A' else 'B'}{body[mid + 1:]}")
    assert e.reason in ("tampered", "damaged")


def raises_any(fn, *args):
    with pytest.raises(IdentityError) as info:
        fn(*args)
    return info.value


def test_invite_text_is_canonical(alice):
    # The last base64 character may carry unused low bits; changing only those is refused too.
    tried = 0
    for name in ("a", "ab", "abc"):  # three payload lengths: every remainder mod 3
        text = I.make_invite(alice, URLS, name)
        head, body = text.rsplit(":", 1)
        if len(body) % 4 == 0:
            continue
        tried += 1
        last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(body[-1])
        stray = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]
        raises("damaged", I.parse_invite, f"{head}:{body[:-1]}{stray}", match="last character")
    assert tried == 2


def test_invite_changed_url_without_resigning_is_tampering(alice):
    payload = _payload(I.make_invite(alice, URLS))
    payload["signal"] = ["wss://evil.example.org"]
    raises("tampered", I.parse_invite, I._encode_invite(payload), match="signature does not match")
    payload = _payload(I.make_invite(alice, URLS, "alice"))
    payload["name"] = "mallory"
    raises("tampered", I.parse_invite, I._encode_invite(payload))


def test_invite_from_someone_else_is_tampering(alice, bob):
    payload = _payload(I.make_invite(alice, URLS))
    payload["chain"] = bob.chain.to_wire()  # bob's chain with alice's signature
    raises("tampered", I.parse_invite, I._encode_invite(payload))


def test_invite_truncated_is_damaged(alice):
    text = I.make_invite(alice, URLS, "alice")
    for cut in (1, 2, 3, 4, len(text) // 2):
        raises("damaged", I.parse_invite, text[:-cut], match="truncated or damaged")
    raises("damaged", I.parse_invite, "aquapeer-invite:1:", match="truncated or damaged")
    raises("damaged", I.parse_invite, "aquapeer-invite:1", match="truncated or damaged")
    raises("damaged", I.parse_invite, text + "!!", match="not base64url")


def test_invite_missing_or_extra_fields_are_damage(alice):
    payload = _payload(I.make_invite(alice, URLS))
    del payload["name"]
    raises("damaged", I.parse_invite, I._encode_invite(payload), match="fields missing")
    payload = _payload(I.make_invite(alice, URLS))
    payload["extra"] = 1
    raises("damaged", I.parse_invite, I._encode_invite(payload))
    payload = _payload(I.make_invite(alice, URLS))
    payload["signal"] = "wss://one.example.org"
    raises("damaged", I.parse_invite, I._encode_invite(payload), match="wrong type")


def test_invite_wrong_prefix_and_version(alice):
    text = I.make_invite(alice, URLS)
    raises("prefix", I.parse_invite, text.replace("aquapeer-invite", "aquapeer-invit"),
           match="not an aquapeer invite")
    raises("prefix", I.parse_invite, "hello")
    e = raises("prefix", I.parse_invite, alice.peer_id)
    assert "peer id" in e.hint
    raises("version", I.parse_invite, text.replace(":1:", ":2:", 1), match="unsupported invite version 2")
    raises("damaged", I.parse_invite, text.replace(":1:", ":x:", 1))
    raises("size", I.parse_invite, text + "A" * I.MAX_INVITE_CHARS)


def test_invite_non_ws_url(alice):
    for bad in ("https://signal.example.org", "ws://", "wss:///path", "signal.example.org",
                "ws://host:99999", "wss://exa mple.org"):
        raises("url", I.make_invite, alice, [bad], match="invalid signal URL")
        # Signed properly by its owner, with the bad URL: still refused on reading.
        wire = alice.chain.to_wire()
        sig = alice.sign(I._invite_signed_bytes(wire, [bad], None))
        text = I._encode_invite({"chain": wire, "signal": [bad], "name": None, "sig": sig})
        raises("url", I.parse_invite, text, match="invalid signal URL")
    raises("url", I.make_invite, alice, "wss://one.example.org")  # a string, not a list
    raises("url", I.make_invite, alice, URLS * 5)
    raises("name", I.make_invite, alice, URLS, "bad\nname")
    raises("name", I.make_invite, alice, URLS, "x" * 65)


# --- envelopes --------------------------------------------------------------

SESSION = b"s" * 16


def _open(data, known, me, **kw):
    kw.setdefault("now", T0)
    return I.open_envelope(data, known, me.peer_id, **kw)


def _reseal(data, signer, **changes):
    """Decode an envelope, change fields, and sign it again with signer's key."""
    signed, _ = msgpack.unpackb(data, raw=False)
    fields = msgpack.unpackb(signed, raw=False)
    fields.update(changes)
    signed = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb([signed, signer.sign(I.ENVELOPE_DOMAIN + signed)], use_bin_type=True)


def test_envelope_round_trip(alice, bob):
    data = I.seal(alice, "offer", bob.peer_id.lower(), SESSION, 1, {"sdp": "v=0", "n": [1, 2]}, now=T0)
    env = _open(data, alice.chain, bob)
    assert (env.kind, env.sender, env.recipient, env.session, env.counter, env.key_index, env.body) == (
        "offer", alice.peer_id, bob.peer_id, SESSION, 1, 0, {"sdp": "v=0", "n": [1, 2]})
    assert env.expires == T0 + 60 and env.from_peer_id == alice.peer_id and env.to_peer_id == bob.peer_id
    assert env.chain is alice.chain
    # Carrying an unchanged chain changes nothing (a stranger's first envelope).
    carried = I.seal(alice, "offer", bob.peer_id, SESSION, 2, {}, now=T0, include_chain=True)
    assert _open(carried, alice.chain, bob).chain is alice.chain


def test_forged_envelope_refused(alice, bob):
    eve = I.Identity.generate()
    forged = _reseal(I.seal(eve, "offer", bob.peer_id, SESSION, 1, {}, now=T0), eve, **{"from": alice.peer_id})
    raises("signature", _open, forged, alice.chain, bob, match="bad signature: not signed by")
    # ... also when it carries eve's chain: it does not hash to alice's id.
    forged = _reseal(I.seal(eve, "offer", bob.peer_id, SESSION, 1, {}, now=T0, include_chain=True), eve,
                     **{"from": alice.peer_id})
    raises("signature", _open, forged, alice.chain, bob, match="key chain does not verify")


def test_altered_envelope_refused(alice, bob):
    data = I.seal(alice, "offer", bob.peer_id, SESSION, 1, {"sdp": "v=0"}, now=T0)
    signed, sig = msgpack.unpackb(data, raw=False)
    altered = msgpack.packb([signed.replace(b"v=0", b"v=1"), sig], use_bin_type=True)
    raises("signature", _open, altered, alice.chain, bob, match="bad signature")
    flipped = msgpack.packb([signed, sig[:-1] + bytes([sig[-1] ^ 1])], use_bin_type=True)
    raises("signature", _open, flipped, alice.chain, bob)


def test_envelope_expiry(alice, bob):
    data = I.seal(alice, "offer", bob.peer_id, SESSION, 1, {}, now=T0, ttl_s=60)
    assert _open(data, alice.chain, bob, now=T0 + 59.9)
    raises("expired", _open, data, alice.chain, bob, now=T0 + 61, match="expired 1.0 s ago")
    far = I.seal(alice, "offer", bob.peer_id, SESSION, 1, {}, now=T0, ttl_s=3600)
    raises("future", _open, far, alice.chain, bob, match="more than 300 s")
    assert _open(far, alice.chain, bob, max_ttl_s=3600)
    nan = _reseal(data, alice, expires=float("nan"))
    raises("malformed", _open, nan, alice.chain, bob)


def test_envelope_wrong_recipient_and_sender(alice, bob):
    carol = I.Identity.generate()
    data = I.seal(alice, "offer", bob.peer_id, SESSION, 1, {}, now=T0)
    raises("recipient", _open, data, alice.chain, carol, match="envelope is for")
    raises("sender", _open, data, carol.chain, bob, match="claims to be from")


def test_malformed_envelopes(alice, bob):
    good = I.seal(alice, "offer", bob.peer_id, SESSION, 1, {}, now=T0)
    signed, sig = msgpack.unpackb(good, raw=False)
    for bad in (b"", b"\xc1", good[:-3], msgpack.packb([signed]), msgpack.packb([signed, sig[:10]]),
                msgpack.packb([b"\x93\x01\x02\x03", sig]), "text", b"x" * (I.MAX_ENVELOPE_BYTES + 1),
                _reseal(good, alice, v=2), _reseal(good, alice, counter=-1), _reseal(good, alice, body=[]),
                _reseal(good, alice, extra=1), _reseal(good, alice, session=b"")):
        raises("malformed", _open, bad, alice.chain, bob, match="malformed envelope")
    raises("malformed", I.seal, alice, "offer", bob.peer_id, SESSION, 1, {"x": object()})
    raises("malformed", I.seal, alice, "offer", bob.peer_id, "not bytes", 1, {})
    raises("malformed", I.seal, alice, "offer", bob.peer_id, SESSION, True, {})
    raises("typo", I.seal, alice, "offer", bob.peer_id[:-1] + ("A" if bob.peer_id[-1] != "A" else "B"),
           SESSION, 1, {})


def test_replay_guard(alice, bob):
    guard = I.ReplayGuard()
    guard.check(alice.peer_id, SESSION, 1)
    raises("replay", guard.check, alice.peer_id, SESSION, 1, match="replayed envelope")
    guard.check(alice.peer_id, SESSION, 5)
    raises("replay", guard.check, alice.peer_id, SESSION, 4, match="replayed envelope")
    guard.check(alice.peer_id, b"other session", 1)
    guard.check(bob.peer_id, SESSION, 1)


def test_replay_guard_memory_is_bounded():
    guard = I.ReplayGuard(max_sessions=3)
    for s in (b"a", b"b", b"c"):
        guard.check("P", s, 1)
    guard.check("P", b"a", 2)          # "a" is now the most recently used
    guard.check("P", b"d", 1)          # evicts "b"
    assert len(guard) == 3
    guard.check("P", b"b", 1)          # forgotten, so accepted again (and evicts "c")
    raises("replay", guard.check, "P", b"a", 2)
    raises("replay", guard.check, "P", b"d", 1)


def test_rotated_sender_carrying_its_chain_is_followed(alice, bob):
    rotated = alice.rotate()
    data = I.seal(rotated, "offer", bob.peer_id, SESSION, 1, {}, now=T0, include_chain=True)
    env = _open(data, alice.chain, bob)
    assert env.chain == rotated.chain and env.chain is not alice.chain and env.key_index == 1
    assert env.chain.extends(alice.chain)
    # From then on the new chain is the known one, no chain needed.
    later = I.seal(rotated, "answer", bob.peer_id, SESSION, 2, {}, now=T0)
    assert _open(later, env.chain, bob).chain is env.chain
    # Two rotations at once are followed too.
    twice = rotated.rotate()
    assert _open(I.seal(twice, "offer", bob.peer_id, SESSION, 3, {}, now=T0, include_chain=True),
                 alice.chain, bob).chain == twice.chain


def test_rotated_sender_without_its_chain_is_refused(alice, bob):
    rotated = alice.rotate()
    data = I.seal(rotated, "offer", bob.peer_id, SESSION, 1, {}, now=T0)
    raises("signature", _open, data, alice.chain, bob, match="carries no key chain")
    # A key_index lie does not help: the old key did not sign it.
    raises("signature", _open, _reseal(data, rotated, key_index=0), alice.chain, bob, match="not signed by")


def test_retired_key_refused_once_rotation_is_known(alice, bob):
    rotated = alice.rotate()
    old = I.seal(alice, "offer", bob.peer_id, SESSION, 1, {}, now=T0, include_chain=True)
    raises("signature", _open, old, rotated.chain, bob, match="retired key 0")


def test_forked_chain_refused(alice, bob):
    # Whoever holds alice's first key can sign a different successor: a fork is refused loudly.
    mine, theirs = alice.rotate(), alice.rotate()
    data = I.seal(theirs, "offer", bob.peer_id, SESSION, 1, {}, now=T0, include_chain=True)
    raises("signature", _open, data, mine.chain, bob, match="forks")


# --- DTLS binding -----------------------------------------------------------

OFFER_FPS = ["sha-256 AA:BB", "sha-512 01:02:03"]
ANSWER_FPS = ["sha-256 CC:DD"]


def test_transcript_is_canonical():
    t = I.fingerprint_transcript(OFFER_FPS, ANSWER_FPS, SESSION)
    assert t == I.fingerprint_transcript(["SHA-512 01:02:03", "sha-256 aa:bb"], ANSWER_FPS * 2, SESSION)
    assert t != I.fingerprint_transcript(ANSWER_FPS, OFFER_FPS, SESSION)  # roles are labelled
    assert t != I.fingerprint_transcript(OFFER_FPS, ANSWER_FPS, b"another session")
    assert b"offer sha-256 AA:BB\n" in t and b"answer sha-256 CC:DD\n" in t
    raises("malformed", I.fingerprint_transcript, [], ANSWER_FPS, SESSION, match="offer has no DTLS")
    raises("malformed", I.fingerprint_transcript, OFFER_FPS, None, SESSION, match="answer has no DTLS")
    raises("malformed", I.fingerprint_transcript, ["sha-256 not hex"], ANSWER_FPS, SESSION)


def test_transcript_sign_and_verify(alice, bob):
    t = I.fingerprint_transcript(OFFER_FPS, ANSWER_FPS, SESSION)
    sig = I.sign_transcript(alice, t)
    assert I.verify_transcript(alice.chain, t, sig)
    assert not I.verify_transcript(bob.chain, t, sig)
    other = I.fingerprint_transcript(OFFER_FPS, ["sha-256 CC:DE"], SESSION)
    assert not I.verify_transcript(alice.chain, other, sig)
    assert not I.verify(alice.public_key, sig, t)  # domain-separated: not a plain signature over t
    rotated = alice.rotate()
    assert not I.verify_transcript(rotated.chain, t, sig)
    assert I.verify_transcript(rotated.chain, t, I.sign_transcript(rotated, t))


@pytest.fixture(scope="module")
def aiortc_offer():
    async def offer():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            pc.createDataChannel("aquapeer")
            await pc.setLocalDescription(await pc.createOffer())
            local = pc.sctp.transport.getLocalParameters().fingerprints
            return pc.localDescription.sdp, [(f.algorithm, f.value) for f in local]
        finally:
            await pc.close()
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(offer())
    finally:
        loop.close()


def test_sdp_fingerprints_from_aiortc(aiortc_offer):
    sdp, local = aiortc_offer
    fps = I.sdp_fingerprints(sdp)
    assert fps == [f"{alg.lower()} {value.upper()}" for alg, value in local]
    assert fps[0].startswith("sha-256 ") and len(fps[0]) == len("sha-256 ") + 32 * 3 - 1
    # Normalised whatever the case, and repeated lines are listed once.
    lowered = "\r\n".join(line.lower() if line.startswith("a=fingerprint:") else line for line in sdp.split("\r\n"))
    assert I.sdp_fingerprints(lowered + lowered) == fps
    assert I.sdp_fingerprints("v=0\r\n") == []
