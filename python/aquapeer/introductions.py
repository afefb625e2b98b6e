"""Introductions: a friend vouching for another friend of its own (pure logic, no database).

An introduction tells its recipient what an invite would (the introduced peer's id, key chain and
signaling servers), plus the introducer's name for that peer, the introducer's display name and
a note.  The introducer signs it with its current key, over the recipient's peer id as well, so
it cannot be passed on to anyone else.  It travels as a durable message on topic
aquapeer.introduce (base64 of msgpack in the JSON payload); the recipient checks it against the
introducer's key chain as the recipient knows it.  A valid introduction only says who the
introducer vouches for: whether it makes a friendship is the recipient's choice.
"""

import base64
import dataclasses

import msgpack

from . import identity
from .identity import IdentityError

TOPIC = "aquapeer.introduce"
VERSION = 1
DOMAIN = b"aquapeer-introduction/1\0"
MAX_NOTE_CHARS = 1000
MAX_PAYLOAD_CHARS = 32 * 1024
_FIELDS = {"to", "chain", "signal", "name", "from_name", "note", "key"}


@dataclasses.dataclass(frozen=True)
class Introduction:
    chain: identity.KeyChain      # the introduced peer's
    signal_urls: list
    introduced_as: str | None     # the introducer's name for the introduced peer
    introducer_name: str | None   # the name the introducer gives itself
    note: str | None

    @property
    def peer_id(self):
        return self.chain.peer_id


def _check_text(value, what, limit):
    if value is None:
        return None
    if (not isinstance(value, str) or len(value) > limit
            or any(ord(c) < 32 and c not in "\n\t" or ord(c) == 127 for c in value)):
        raise IdentityError(f"an introduction's {what} must be text of at most {limit} characters "
                            "without control characters", reason="malformed")
    return value


def make(introducer, recipient_peer_id, introduced_chain, signal_urls, introduced_as,
         introducer_name, note):
    """The message payload introducing the peer of introduced_chain to recipient_peer_id."""
    if introduced_chain.peer_id == recipient_peer_id:
        raise IdentityError("a friend cannot be introduced to itself", reason="self",
                            hint="Name two different friends.")
    body = {
        "to": identity.parse_peer_id(recipient_peer_id),
        "chain": introduced_chain.to_wire(),
        "signal": [identity.check_signal_url(u) for u in list(signal_urls)[:identity.MAX_SIGNAL_URLS]],
        "name": _check_text(introduced_as, "name", identity.MAX_NAME_CHARS),
        "from_name": _check_text(introducer_name, "display name", identity.MAX_NAME_CHARS),
        "note": _check_text(note, "note", MAX_NOTE_CHARS),
        "key": introducer.chain.index,
    }
    signed = msgpack.packb(body, use_bin_type=True)
    return {"v": VERSION,
            "introduction": base64.b64encode(signed).decode(),
            "sig": base64.b64encode(introducer.sign(DOMAIN + signed)).decode()}


def _damaged(what):
    return IdentityError(f"the introduction is damaged: {what}", reason="malformed",
                         hint="Ask the introducer to send it again with peer.introduce().")


def _decode(text, what):
    if not isinstance(text, str) or len(text) > MAX_PAYLOAD_CHARS:
        raise _damaged(f"{what} is not base64 text of at most {MAX_PAYLOAD_CHARS} characters")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise _damaged(f"{what} is not base64") from None


def open_(payload, introducer_chain, my_peer_id):
    """The Introduction in payload, checked: signed by the introducer's key chain and meant for
    my_peer_id.  IdentityError (with a reason) for anything else."""
    if not isinstance(payload, dict) or payload.get("v") != VERSION:
        version = payload.get("v") if isinstance(payload, dict) else None
        if isinstance(version, int) and version > VERSION:
            raise IdentityError(f"introduction version {version} is newer than this aquapeer reads ({VERSION})",
                                reason="version", hint="Upgrade aquapeer here, then peer.retry_message() it.")
        raise _damaged("not a version 1 introduction")
    signed = _decode(payload.get("introduction"), "its body")
    signature = _decode(payload.get("sig"), "its signature")
    try:
        body = msgpack.unpackb(signed, raw=False, strict_map_key=True)
    except Exception as e:
        raise _damaged(str(e)) from None
    if not isinstance(body, dict) or set(body) != _FIELDS:
        raise _damaged("unexpected fields")
    key_index = body["key"]
    if not isinstance(key_index, int) or not 0 <= key_index <= introducer_chain.index:
        raise IdentityError("the introduction is signed with a key the introducer's chain does not hold",
                            reason="signature", hint="The introducer may have been reset; check with its owner.")
    if not identity.verify(introducer_chain.key_at(key_index), signature, DOMAIN + signed):
        raise IdentityError("the introduction's signature does not verify with the introducer's key",
                            reason="signature", hint="It was altered on the way or forged; it is ignored.")
    if body["to"] != my_peer_id:
        raise IdentityError("the introduction is meant for another peer", reason="recipient",
                            detail=f"meant for {body['to']}")
    try:
        chain = identity.KeyChain.from_wire(body["chain"])
        urls = body["signal"]
        if not isinstance(urls, list) or len(urls) > identity.MAX_SIGNAL_URLS:
            raise _damaged("signal is not a short list of URLs")
        urls = [identity.check_signal_url(u) for u in urls]
    except IdentityError as e:
        raise IdentityError(f"the introduced peer's key chain or servers do not check out: {e.message}",
                            reason="chain") from None
    return Introduction(chain, urls, _check_text(body["name"], "name", identity.MAX_NAME_CHARS),
                        _check_text(body["from_name"], "display name", identity.MAX_NAME_CHARS),
                        _check_text(body["note"], "note", MAX_NOTE_CHARS))
