"""Who a peer is, and how peers prove it to each other.

- A peer id names an identity: the SHA-256 of its FIRST Ed25519 public key,
  written like a Syncthing device id (base32, a Luhn mod 32 check character
  per 13 characters, 8 groups of 7) so people can read it aloud and a typo
  is caught instead of pointing at a stranger.
- A KeyChain is the identity's key history.  Each new key is signed by the
  previous one, so a friend who knows an older chain can follow a rotation
  without trusting anyone else; the peer id never changes.
- An invite is one line of text (no secret) carrying the chain and the
  signaling URLs, signed by the current key.
- An envelope is what two peers send each other through the untrusted
  signaling server: signed, addressed, numbered and short-lived.
- After the data channel opens, each side signs a transcript of both DTLS
  fingerprints, binding the WebRTC session to the identities.

Every signature is made over a domain label followed by the data, so a
signature made for one purpose can never be replayed as another.  Pure
logic: no database, no network; runs inside PL/Python and outside.
"""

import base64
import collections
import dataclasses
import hashlib
import math
import re
import time
import urllib.parse

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import AquapeerError

MAX_CHAIN = 64                  # keys in a chain: 63 rotations
MAX_INVITE_CHARS = 16 * 1024    # a full 64-key chain and 8 long URLs still fit
MAX_SIGNAL_URLS = 8
MAX_URL_CHARS = 512
MAX_NAME_CHARS = 64
MAX_ENVELOPE_BYTES = 64 * 1024  # an SDP with many candidates is a few KiB
MAX_SESSION_BYTES = 64
MAX_KIND_CHARS = 64

INVITE_PREFIX = "aquapeer-invite:"
INVITE_VERSION = 1
ENVELOPE_VERSION = 1

# Domain labels, one per kind of signed data.
ROTATE_DOMAIN = b"aquapeer-rotate/1\0"
INVITE_DOMAIN = b"aquapeer-invite/1\0"
ENVELOPE_DOMAIN = b"aquapeer-envelope/1\0"
TRANSCRIPT_DOMAIN = b"aquapeer-transcript/1\0"

_KEY_BYTES = 32
_SIG_BYTES = 64
_INVITE_HINT = "Copy the whole line from `select peer.invite()` on the other database."


class IdentityError(AquapeerError):
    """A peer id, key chain, invite, envelope or transcript that does not check out.

    ``reason`` is a short machine-readable word for callers that branch on
    the kind of failure (e.g. "malformed", "expired", "signature").
    """

    sqlstate = "22023"  # invalid_parameter_value

    def __init__(self, message, *, hint=None, detail=None, sqlstate=None, reason=None):
        super().__init__(message, hint=hint, detail=detail, sqlstate=sqlstate)
        self.reason = reason


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data):
    """Decode untrusted msgpack (callers turn any exception into their own "damaged" error)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def _short(text, limit=80):
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --- peer ids ---------------------------------------------------------------

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_VALUE = {c: i for i, c in enumerate(_B32)}
# 0, 1 and 8 are not in the alphabet; people type them for O, I and B (Syncthing does the same).
_UNTYPO = str.maketrans("018", "OIB")


def _luhn32(s):
    """Syncthing's Luhn mod 32 check character.

    Syncthing starts the factor at 1 on the LEFTMOST character (textbook
    Luhn mod N starts at the right); we keep its variant so our ids check
    the same way.  Either way doubling is a bijection mod 32, so every
    single-character substitution changes the check character.
    """
    factor, total = 1, 0
    for ch in s:
        addend = factor * _B32_VALUE[ch]
        factor = 3 - factor
        total += addend // 32 + addend % 32
    return _B32[(32 - total % 32) % 32]


def _display(s56):
    return "-".join(s56[i:i + 7] for i in range(0, 56, 7))


def peer_id_from_key(public_key):
    """The display peer id ("XXXXXXX-…", 8 groups of 7) of an identity's first public key."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != _KEY_BYTES:
        raise IdentityError("a public key must be 32 raw bytes", reason="malformed")
    b32 = base64.b32encode(hashlib.sha256(public_key).digest()).decode().rstrip("=")
    groups = [b32[i:i + 13] for i in range(0, 52, 13)]
    return _display("".join(g + _luhn32(g) for g in groups))


def parse_peer_id(text):
    """The canonical display form of a peer id typed in any case, with or without dashes or spaces."""
    if not isinstance(text, str):
        raise IdentityError("a peer id must be text", reason="malformed")
    s = re.sub(r"[\s-]", "", text).upper().translate(_UNTYPO)
    hint = "Copy the peer id again from the other database; it is 8 groups of 7 characters."
    if len(s) != 56:
        raise IdentityError(f"peer id {_short(text)} has {len(s)} characters, not 56 (8 groups of 7)",
                            hint=hint, reason="malformed")
    bad = sorted({c for c in s if c not in _B32_VALUE})
    if bad:
        raise IdentityError(f"peer id {_short(text)} contains {''.join(bad)!r}: only A-Z and 2-7 are used",
                            hint=hint, reason="malformed")
    for g in range(4):
        part = s[g * 14:(g + 1) * 14]
        if _luhn32(part[:13]) != part[13]:
            raise IdentityError(
                f"peer id {_short(text)} has a typo: check character of group {g + 1} does not match "
                f"(the typo is in the groups shown as {2 * g + 1} and {2 * g + 2})",
                hint=hint, reason="typo")
    return _display(s)


# --- signatures -------------------------------------------------------------

def verify(public_key, signature, data):
    """True when signature is public_key's Ed25519 signature over data (raw: no domain label)."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), bytes(data))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _rotation_message(peer_id, index, public_key):
    return ROTATE_DOMAIN + peer_id.encode() + index.to_bytes(8, "big") + public_key


# --- key chains -------------------------------------------------------------

def _malformed_chain(what):
    return IdentityError(f"key chain is malformed: {what}", reason="malformed")


class KeyChain:
    """An identity's keys, oldest first; every KeyChain object has been verified.

    entries[0] is (first public key, None) and defines the peer id; entry
    i > 0 is (public key i, signature by key i-1 over ROTATE_DOMAIN +
    peer id + i as 8 bytes big-endian + public key i).
    """

    __slots__ = ("_entries", "_peer_id")

    def __init__(self, entries, expected_peer_id=None):
        if not isinstance(entries, (list, tuple)) or not entries:
            raise _malformed_chain("it has no keys")
        if len(entries) > MAX_CHAIN:
            raise _malformed_chain(f"{len(entries)} keys, more than {MAX_CHAIN}")
        clean = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise _malformed_chain(f"entry {i} is not a (key, signature) pair")
            key, sig = entry
            if not isinstance(key, (bytes, bytearray)) or len(key) != _KEY_BYTES:
                raise _malformed_chain(f"key {i} is not 32 bytes")
            if i == 0 and sig is not None:
                raise _malformed_chain("the first key carries a signature")
            if i > 0 and (not isinstance(sig, (bytes, bytearray)) or len(sig) != _SIG_BYTES):
                raise _malformed_chain(f"the signature of key {i} is not 64 bytes")
            clean.append((bytes(key), None if sig is None else bytes(sig)))
        if len({key for key, _ in clean}) != len(clean):
            raise IdentityError("key chain is broken: a key appears twice", reason="broken")
        peer_id = peer_id_from_key(clean[0][0])
        if expected_peer_id is not None and peer_id != parse_peer_id(expected_peer_id):
            raise IdentityError(f"key chain belongs to {peer_id}, not {parse_peer_id(expected_peer_id)}",
                                reason="sender")
        for i in range(1, len(clean)):
            if not verify(clean[i - 1][0], clean[i][1], _rotation_message(peer_id, i, clean[i][0])):
                raise IdentityError(f"key chain of {peer_id} is broken: key {i} is not signed by key {i - 1}",
                                    reason="broken")
        self._entries = tuple(clean)
        self._peer_id = peer_id

    @property
    def entries(self):
        return list(self._entries)

    @property
    def peer_id(self):
        return self._peer_id

    @property
    def current_key(self):
        return self._entries[-1][0]

    @property
    def index(self):
        return len(self._entries) - 1

    def key_at(self, index):
        return self._entries[index][0]

    def to_wire(self):
        return [[key, sig] for key, sig in self._entries]

    @classmethod
    def from_wire(cls, obj, expected_peer_id=None):
        """A verified chain from its to_wire() form; IdentityError on any break."""
        return cls(obj, expected_peer_id)

    def to_bytes(self):
        """The chain as msgpack, as the database stores it."""
        return _pack(self.to_wire())

    @classmethod
    def from_bytes(cls, data, expected_peer_id=None):
        try:
            wire = _unpack(bytes(data))
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise _malformed_chain(f"not msgpack ({e})") from None
        return cls(wire, expected_peer_id)

    def extends(self, other):
        """True when self starts with all of other's entries: the same identity, as new or newer."""
        n = len(other._entries)
        return len(self._entries) >= n and self._entries[:n] == other._entries

    def _appended(self, public_key, signature):
        return KeyChain(list(self._entries) + [(public_key, signature)])

    def __len__(self):
        return len(self._entries)

    def __eq__(self, other):
        return isinstance(other, KeyChain) and self._entries == other._entries

    def __hash__(self):
        return hash(self._entries)

    def __repr__(self):
        return f"KeyChain({self._peer_id}, index={self.index})"


# --- identities -------------------------------------------------------------

def _raw_private(key):
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _raw_public(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Identity:
    """A peer's own identity: its key chain and the private key of the chain's current key."""

    __slots__ = ("_key", "chain")

    def __init__(self, private_key, chain):
        if not isinstance(private_key, (bytes, bytearray)) or len(private_key) != _KEY_BYTES:
            raise IdentityError("identity secret is damaged: the private key is not 32 bytes",
                                reason="malformed")
        self._key = Ed25519PrivateKey.from_private_bytes(bytes(private_key))
        if _raw_public(self._key) != chain.current_key:
            raise IdentityError("identity secret is damaged: the private key does not match the "
                                "current key of the key chain", reason="mismatch")
        self.chain = chain

    @classmethod
    def generate(cls):
        key = Ed25519PrivateKey.generate()
        return cls(_raw_private(key), KeyChain([(_raw_public(key), None)]))

    @property
    def private_key(self):
        return _raw_private(self._key)

    @property
    def public_key(self):
        return self.chain.current_key

    @property
    def peer_id(self):
        return self.chain.peer_id

    def sign(self, data):
        """Raw Ed25519 signature by the current key.  Callers: prefix your own domain label."""
        return self._key.sign(bytes(data))

    def rotate(self):
        """A new Identity with a fresh key appended to the chain; the peer id stays."""
        if len(self.chain) >= MAX_CHAIN:
            raise IdentityError(f"this identity has rotated its key {MAX_CHAIN - 1} times, the most a "
                                "key chain can hold", hint="Create a new identity and invite your friends again.",
                                reason="full")
        new = Ed25519PrivateKey.generate()
        public = _raw_public(new)
        sig = self.sign(_rotation_message(self.peer_id, len(self.chain), public))
        return Identity(_raw_private(new), self.chain._appended(public, sig))

    def to_secret(self):
        """The private blob to store (readable by the extension owner only)."""
        return _pack({"v": 1, "key": self.private_key, "chain": self.chain.to_wire()})

    @classmethod
    def from_secret(cls, blob):
        try:
            obj = _unpack(bytes(blob))
        except Exception as e:
            raise IdentityError(f"identity secret is damaged: {e}", reason="malformed") from None
        if not isinstance(obj, dict) or obj.get("v") != 1 or "key" not in obj or "chain" not in obj:
            raise IdentityError("identity secret is damaged: not a version 1 aquapeer identity",
                                reason="malformed")
        try:
            chain = KeyChain.from_wire(obj["chain"])
        except IdentityError as e:
            raise IdentityError(f"identity secret is damaged: {e.message}", reason=e.reason) from None
        return cls(obj["key"], chain)

    def __repr__(self):  # never the private key
        return f"Identity({self.peer_id}, index={self.chain.index})"


# --- invites ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Invite:
    peer_id: str
    chain: KeyChain
    signal_urls: list
    name_hint: str | None


def check_signal_url(url):
    """url when it is a ws:// or wss:// URL with a host; IdentityError otherwise."""
    problem = None
    if not isinstance(url, str):
        problem = "it is not text"
    elif len(url) > MAX_URL_CHARS:
        problem = f"it is longer than {MAX_URL_CHARS} characters"
    elif any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        problem = "it contains spaces or control characters"
    else:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 (reading it raises ValueError on a bad port)
        except ValueError as e:
            problem = str(e)
        else:
            if parts.scheme.lower() not in ("ws", "wss"):
                problem = "it must start with ws:// or wss://"
            elif not parts.hostname:
                problem = "it has no host"
    if problem:
        raise IdentityError(f"invalid signal URL {_short(str(url))}: {problem}",
                            hint="A signal URL looks like wss://signal.example.org or ws://10.0.0.5:8765.",
                            reason="url")
    return url


def _check_name(name):
    if name is None:
        return None
    if (not isinstance(name, str) or len(name) > MAX_NAME_CHARS
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise IdentityError(f"invite name hint must be text of at most {MAX_NAME_CHARS} characters "
                            "without control characters", reason="name")
    return name


def _invite_signed_bytes(chain_wire, urls, name):
    # The map is built in a fixed key order, so packing it is canonical.
    return INVITE_DOMAIN + _pack({"chain": chain_wire, "signal": urls, "name": name})


def _encode_invite(payload):
    return (f"{INVITE_PREFIX}{INVITE_VERSION}:"
            + base64.urlsafe_b64encode(_pack(payload)).decode().rstrip("="))


def make_invite(identity, signal_urls, name_hint=None):
    """One line of text, safe to paste in chat, that lets a friend find and check this identity."""
    if isinstance(signal_urls, str) or not isinstance(signal_urls, (list, tuple)):
        raise IdentityError("signal_urls must be a list of URLs", reason="url")
    if len(signal_urls) > MAX_SIGNAL_URLS:
        raise IdentityError(f"an invite holds at most {MAX_SIGNAL_URLS} signal URLs", reason="url")
    urls = [check_signal_url(u) for u in signal_urls]
    name = _check_name(name_hint)
    wire = identity.chain.to_wire()
    sig = identity.sign(_invite_signed_bytes(wire, urls, name))
    text = _encode_invite({"chain": wire, "signal": urls, "name": name, "sig": sig})
    if len(text) > MAX_INVITE_CHARS:
        raise IdentityError(f"invite would be {len(text)} characters, more than {MAX_INVITE_CHARS}",
                            hint="Use fewer or shorter signal URLs.", reason="size")
    return text


def _damaged(what):
    return IdentityError(f"invite is truncated or damaged: {what}", hint=_INVITE_HINT, reason="damaged")


def _tampered(what):
    return IdentityError(f"invite has been tampered with: {what}",
                         hint="Ask the other database's owner for a fresh invite over a channel you trust.",
                         reason="tampered")


def parse_invite(text):
    """The Invite in text (whitespace anywhere is ignored: chat apps wrap lines)."""
    if not isinstance(text, str):
        raise IdentityError("an invite must be text", reason="prefix")
    compact = "".join(text.split())
    if len(compact) > MAX_INVITE_CHARS:
        raise IdentityError(f"invite is {len(compact)} characters, more than {MAX_INVITE_CHARS}",
                            hint=_INVITE_HINT, reason="size")
    if not compact.lower().startswith(INVITE_PREFIX):
        hint = _INVITE_HINT
        try:
            parse_peer_id(compact)
            hint = "That is a peer id; adding a friend needs their invite. " + hint
        except IdentityError:
            pass
        raise IdentityError(f"not an aquapeer invite: it should start with {INVITE_PREFIX!r}",
                            hint=hint, reason="prefix")
    version, sep, body = compact[len(INVITE_PREFIX):].partition(":")
    if not sep:
        raise _damaged("no version")
    if version != str(INVITE_VERSION):
        if version.isdigit():
            raise IdentityError(f"unsupported invite version {version}: this aquapeer reads version "
                                f"{INVITE_VERSION}", hint="Upgrade aquapeer on this database.",
                                reason="version")
        raise _damaged(f"bad version {_short(version, 12)}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", body) or len(body) % 4 == 1:
        raise _damaged("not base64url")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != body:
        raise _damaged("its last character is wrong")  # stray low bits: one text per invite
    try:
        obj = _unpack(raw)
    except Exception as e:
        raise _damaged(str(e)) from None
    if not isinstance(obj, dict) or set(obj) != {"chain", "signal", "name", "sig"}:
        raise _damaged("fields missing or unknown")
    urls, name, sig = obj["signal"], obj["name"], obj["sig"]
    if (not isinstance(urls, list) or len(urls) > MAX_SIGNAL_URLS or not all(isinstance(u, str) for u in urls)
            or not (name is None or isinstance(name, str))
            or not isinstance(sig, bytes) or len(sig) != _SIG_BYTES):
        raise _damaged("fields of the wrong type")
    try:
        chain = KeyChain.from_wire(obj["chain"])
    except IdentityError as e:
        raise (_damaged if e.reason == "malformed" else _tampered)(e.message) from None
    # Verify before looking at the URLs: a changed URL is tampering, whatever it says.
    if not verify(chain.current_key, sig, _invite_signed_bytes(chain.to_wire(), urls, name)):
        raise _tampered("its signature does not match its contents")
    for url in urls:
        check_signal_url(url)
    return Invite(chain.peer_id, chain, list(urls), _check_name(name))


# --- envelopes --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Envelope:
    """An opened envelope.  chain: the sender's chain to use (and store) from now on."""

    kind: str
    sender: str        # "from" on the wire
    recipient: str     # "to" on the wire
    session: bytes
    counter: int
    expires: float
    key_index: int
    body: dict
    chain: KeyChain

    @property
    def from_peer_id(self):
        return self.sender

    @property
    def to_peer_id(self):
        return self.recipient


_ENVELOPE_KEYS = {"v", "kind", "from", "to", "session", "counter", "expires", "key_index", "body"}


def _check_counter(counter):
    return isinstance(counter, int) and not isinstance(counter, bool) and 0 <= counter < 2 ** 63


def seal(identity, kind, to_peer_id, session, counter, body, ttl_s=60, now=None, include_chain=False):
    """msgpack [signed bytes, signature] for the signaling server to carry to to_peer_id."""
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        raise IdentityError("envelope kind must be a short text", reason="malformed")
    if not isinstance(session, (bytes, bytearray)) or not 0 < len(session) <= MAX_SESSION_BYTES:
        raise IdentityError(f"envelope session must be 1 to {MAX_SESSION_BYTES} bytes", reason="malformed")
    if not _check_counter(counter):
        raise IdentityError("envelope counter must be an integer from 0 to 2**63-1", reason="malformed")
    if not isinstance(body, dict):
        raise IdentityError("envelope body must be a dict", reason="malformed")
    if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
        raise IdentityError("envelope ttl_s must be a positive number of seconds", reason="malformed")
    fields = {"v": ENVELOPE_VERSION, "kind": kind, "from": identity.peer_id, "to": parse_peer_id(to_peer_id),
              "session": bytes(session), "counter": counter,
              "expires": float((time.time() if now is None else now) + ttl_s),
              "key_index": identity.chain.index, "body": body}
    if include_chain:
        fields["chain"] = identity.chain.to_wire()
    try:
        signed = _pack(fields)
    except (TypeError, ValueError, OverflowError) as e:
        raise IdentityError(f"envelope body cannot be encoded: {e}", reason="malformed") from None
    data = _pack([signed, identity.sign(ENVELOPE_DOMAIN + signed)])
    if len(data) > MAX_ENVELOPE_BYTES:
        raise IdentityError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}", reason="size")
    return data


def _malformed(what):
    return IdentityError(f"malformed envelope: {what}", reason="malformed")


def _bad_signature(what):
    return IdentityError(f"envelope has a bad signature: {what}", reason="signature")


def _envelope_fields(data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _malformed("not bytes")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise _malformed(f"{len(data)} bytes, more than {MAX_ENVELOPE_BYTES}")
    try:
        outer = _unpack(bytes(data))
        if not (isinstance(outer, list) and len(outer) == 2 and isinstance(outer[0], bytes)
                and isinstance(outer[1], bytes) and len(outer[1]) == _SIG_BYTES):
            raise _malformed("not a [signed, signature] pair")
        signed, sig = outer
        fields = _unpack(signed)
    except IdentityError:
        raise
    except Exception as e:
        raise _malformed(str(e)) from None
    if not isinstance(fields, dict):
        raise _malformed("the signed part is not a map")
    if fields.get("v") != ENVELOPE_VERSION:
        raise _malformed(f"version {fields.get('v')!r}, this aquapeer reads {ENVELOPE_VERSION}")
    if not _ENVELOPE_KEYS <= set(fields) <= _ENVELOPE_KEYS | {"chain"}:
        raise _malformed("fields missing or unknown")
    ok = (isinstance(fields["kind"], str) and isinstance(fields["from"], str) and isinstance(fields["to"], str)
          and isinstance(fields["session"], bytes) and 0 < len(fields["session"]) <= MAX_SESSION_BYTES
          and _check_counter(fields["counter"]) and _check_counter(fields["key_index"])
          and isinstance(fields["expires"], float) and math.isfinite(fields["expires"])
          and isinstance(fields["body"], dict))
    if not ok:
        raise _malformed("fields of the wrong type")
    return signed, sig, fields


def open_envelope(data, known_chain, my_peer_id, now=None, max_ttl_s=300):
    """Check an envelope from the holder of known_chain to me; the opened Envelope or IdentityError.

    Authenticate with open_envelope BEFORE ReplayGuard.check, so forged
    envelopes cannot advance the replay counters.
    """
    signed, sig, f = _envelope_fields(data)
    if f["to"] != parse_peer_id(my_peer_id):
        raise IdentityError(f"envelope is for {_short(f['to'])}, not for this peer ({my_peer_id})",
                            reason="recipient")
    if f["from"] != known_chain.peer_id:
        raise IdentityError(f"envelope claims to be from {_short(f['from'])}, expected {known_chain.peer_id}",
                            reason="sender")
    chain = known_chain
    if "chain" in f:
        try:
            carried = KeyChain.from_wire(f["chain"], expected_peer_id=known_chain.peer_id)
        except IdentityError as e:
            raise _bad_signature(f"its key chain does not verify: {e.message}") from None
        if len(carried) > len(known_chain) and carried.extends(known_chain):
            chain = carried  # the sender rotated its key: follow it
        elif not known_chain.extends(carried):
            # Two valid chains that disagree: someone holding a retired key signed a different successor.
            raise _bad_signature(f"its key chain forks from the one on record for {known_chain.peer_id}; "
                                 "one of its old keys may have leaked")
    if f["key_index"] != chain.index:
        if f["key_index"] < chain.index:
            raise _bad_signature(f"signed with retired key {f['key_index']}; the current key is {chain.index}")
        raise _bad_signature(f"signed with key {f['key_index']} but key {chain.index} is the newest on record, "
                             "and the envelope carries no key chain to prove the rotation")
    if not verify(chain.current_key, sig, ENVELOPE_DOMAIN + signed):
        raise _bad_signature(f"not signed by {known_chain.peer_id}")
    # Checked only once the envelope is known to be genuine, so a clock problem reads as one.
    now = time.time() if now is None else now
    if f["expires"] < now:
        raise IdentityError(f"envelope expired {now - f['expires']:.1f} s ago",
                            hint="Check that both machines' clocks are right (NTP).", reason="expired")
    if f["expires"] - now > max_ttl_s:
        raise IdentityError(f"envelope expires {f['expires'] - now:.0f} s from now, more than {max_ttl_s} s",
                            hint="Check that both machines' clocks are right (NTP).", reason="future")
    return Envelope(f["kind"], f["from"], f["to"], f["session"], f["counter"], f["expires"],
                    f["key_index"], f["body"], chain)


class ReplayGuard:
    """Refuse an envelope whose counter is not above the last accepted in its (sender, session).

    Memory is bounded: the least recently used sessions are forgotten past
    max_sessions.  A forgotten session's envelopes could be replayed until
    they expire, so keep max_sessions above the sessions seen in max_ttl_s.
    """

    def __init__(self, max_sessions=10000):
        self.max_sessions = max_sessions
        self._last = collections.OrderedDict()

    def check(self, sender_peer_id, session, counter):
        key = (sender_peer_id, bytes(session))
        last = self._last.get(key)
        if last is not None and counter <= last:
            raise IdentityError(f"replayed envelope from {sender_peer_id}: counter {counter} is not above "
                                f"{last}, already accepted in this session", reason="replay")
        self._last[key] = counter
        self._last.move_to_end(key)
        while len(self._last) > self.max_sessions:
            self._last.popitem(last=False)

    def __len__(self):
        return len(self._last)


# --- DTLS binding -----------------------------------------------------------

_FINGERPRINT = re.compile(r"([A-Za-z0-9-]+)\s+([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})+)")
_SDP_FINGERPRINT = re.compile(r"^a=fingerprint:[ \t]*(\S+)[ \t]+(\S+)[ \t]*\r?$", re.MULTILINE)


def normalize_fingerprint(value):
    """'SHA-256 ab:cd:…' -> 'sha-256 AB:CD:…'."""
    m = _FINGERPRINT.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m:
        raise IdentityError(f"not a DTLS fingerprint: {_short(str(value))}", reason="malformed")
    return f"{m.group(1).lower()} {m.group(2).upper()}"


def sdp_fingerprints(sdp):
    """The a=fingerprint values of an SDP, normalised, in order, without repeats."""
    found = []
    for algorithm, hexes in _SDP_FINGERPRINT.findall(sdp):
        fp = normalize_fingerprint(f"{algorithm} {hexes}")
        if fp not in found:
            found.append(fp)
    return found


def fingerprint_transcript(offer_fingerprints, answer_fingerprints, session):
    """The bytes both sides sign once the data channel is open: both DTLS fingerprint sets and the session.

    Sorted and labelled, so both sides build the same bytes from the same two
    SDPs whatever order the lines came in.
    """
    offer = sorted({normalize_fingerprint(f) for f in offer_fingerprints or ()})
    answer = sorted({normalize_fingerprint(f) for f in answer_fingerprints or ()})
    if not offer or not answer:
        raise IdentityError("cannot bind the connection: the "
                            + ("offer" if not offer else "answer") + " has no DTLS fingerprint",
                            reason="malformed")
    if not isinstance(session, (bytes, bytearray)):
        raise IdentityError("transcript session must be bytes", reason="malformed")
    lines = ["aquapeer-transcript/1", f"session {bytes(session).hex()}"]
    lines += [f"offer {f}" for f in offer] + [f"answer {f}" for f in answer]
    return ("\n".join(lines) + "\n").encode()


def sign_transcript(identity, transcript):
    return identity.sign(TRANSCRIPT_DOMAIN + transcript)


def verify_transcript(chain, transcript, signature):
    return verify(chain.current_key, signature, TRANSCRIPT_DOMAIN + transcript)
