"""A peer: its identity, its friends, its signaling registration and its links.

The network worker runs one PeerNode with a friend book kept in the
database; light peers (tests, benchmarks) run one with a friend book in
memory.  Both speak the same protocol with the same identity checks.

Connecting: the offerer sends an ``offer`` envelope (signed, carrying its
key chain so a stranger's request can be verified too), the answerer
replies with ``answer``, ICE and DTLS run, and both sides prove their key
over the open channel (transport.Link).  A stranger's offer is recorded as a
friend request and answered with ``refused``.  When both sides offer at
once, the side with the smaller peer id keeps its offer.  An answerer that
gathered no candidate at all (its STUN and TURN servers failed) hangs up
saying so, and the offerer's link fails at once with that reason.
"""

import asyncio
import logging
import os
import random
import time

import msgpack

from .. import identity
from ..errors import AquapeerError
from ..friends import Friend
from . import transport, wire
from .signaling import PeerOffline, SignalClient

log = logging.getLogger("aquapeer.node")

RECONNECT_FIRST_S = 1.0
RECONNECT_MAX_S = 10.0
# Each tick reads the friend list; once a second is enough for backoffs of 1 s and more.
SUPERVISE_INTERVAL_S = 1.0
OFFLINE = "friend not reachable at the signaling server"
OFFLINE_RETRY_S = 0.5
SIGNAL_ACK_WAIT_S = 2.0
# A link still negotiating after this long is given up and retried.
NEGOTIATION_TIMEOUT_S = 15.0
# When both sides offered, ours wins only while it is this fresh.
OFFER_FRESH_S = 5.0
# The signaling server allows 20 envelopes a second per peer (burst 50):
# offers and refusals stay well under that.
OFFERS_PER_TICK = 10
REFUSALS_PER_SECOND = 5
# Refused frames are all counted, but logged at most this often per friend.
REFUSED_LOG_INTERVAL_S = 10.0


class ConnectError(AquapeerError):
    sqlstate = "08001"  # sqlclient_unable_to_establish_sqlconnection


class MemoryFriendBook:
    """Friends and friend requests kept in memory (light peers, tests)."""

    def __init__(self):
        self.friends = {}
        self.requests = {}

    def add(self, name, chain, auto_connect=True):
        self.friends[chain.peer_id] = Friend(chain.peer_id, name, chain, True, auto_connect)

    def lookup(self, peer_id):
        return self.friends.get(peer_id)

    def accepted(self):
        return [f for f in self.friends.values() if f.accepted]

    def update_chain(self, peer_id, chain):
        self.friends[peer_id].chain = chain

    def record_request(self, peer_id, claimed_name, chain):
        entry = self.requests.setdefault(peer_id, {"name": claimed_name, "attempts": 0, "first_seen": time.time()})
        entry["attempts"] += 1

    def seen(self, peer_id):
        pass


def _envelope_chain(data):
    """The key chain an envelope carries, unverified (open_envelope verifies it)."""
    try:
        signed, _sig = msgpack.unpackb(data, raw=False)
        wire = msgpack.unpackb(signed, raw=False).get("chain")
        return identity.KeyChain.from_wire(wire) if wire else None
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException, identity.IdentityError):
        return None


class PeerNode:
    def __init__(self, me, friends, signal_url, ice=None, *, name=None, ssl_context=None, on_frame=None,
                 on_connected=None, on_disconnected=None, fallback_signal_urls=(),
                 message_limit=lambda: 16 * 1024 * 1024):
        self.me = me
        self.friends = friends
        self.ice = ice or transport.IceServers()
        self.name = name  # what we call ourselves in offers: text, or a function giving it
        self.on_frame = on_frame          # (link, frame) -> None, for frames the link does not handle itself
        self.on_connected = on_connected  # (link) -> None, once a link is verified
        self.on_disconnected = on_disconnected  # (link) -> None, when a link that was verified closes
        self.message_limit = message_limit  # () -> the largest message we accept, told each new link
        self._refusals_logged = {}        # peer id -> when a refusal was last logged
        self.links = {}         # peer id -> Link being made or connected
        self.last_closed = {}   # peer id -> the last Link that closed, for its state and error
        self.attempts = {}      # peer id -> (failures in a row, next attempt at)
        self.replay = identity.ReplayGuard()
        # One counter for every envelope we send: strictly increasing within
        # each session, which is all the friend's replay guard asks.
        self._counter = 0
        self._refusals = (0, 0)  # (second, refusals sent in it)
        self.ssl_context = ssl_context
        self.signal = self._signal_client(signal_url, fallback_urls=fallback_signal_urls)
        self.other_signals = {}  # url -> SignalClient, for friends reached elsewhere
        self._supervisor = None

    async def start(self):
        await self.signal.start()
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def stop(self):
        if self._supervisor:
            self._supervisor.cancel()
        for peer_id, link in list(self.links.items()):
            if link.state == "connecting":
                # No channel to say bye on yet: hang up through the server, so the
                # friend does not wait out its timeout on an offer we will not finish.
                try:
                    await self._send("hangup", peer_id, link.session, {})
                except AquapeerError:
                    pass
            link.close("shutting down")
        for client in [self.signal, *self.other_signals.values()]:
            await client.close()

    async def _signal_for(self, friend):
        """The signaling client to reach friend: its override, else ours; registered on first use."""
        if not friend.signal_url or friend.signal_url in self.signal.urls:
            return self.signal
        client = self.other_signals.get(friend.signal_url)
        if client is None:
            client = self.other_signals[friend.signal_url] = self._signal_client(friend.signal_url)
            await client.start()
        return client

    def _signal_client(self, url, fallback_urls=()):
        client = SignalClient(url, self.me, self._on_envelope, ssl_context=self.ssl_context,
                              fallback_urls=fallback_urls)
        client.on_state = lambda state: self._on_signal_state(client, state)
        return client

    def _on_signal_state(self, client, state):
        """A server that goes away loses the offers and answers it was holding, so a link
        still negotiating through it may never hear back: close it, to be offered again."""
        if state in ("connecting", "connected"):
            return
        for link in list(self.links.values()):
            if link.state == "connecting" and link.signal is client:
                link.close(f"the signaling server {client.url} went away during negotiation")

    def _ice_for(self, friend):
        if not friend.stun_url:
            return self.ice
        return transport.IceServers([friend.stun_url] + [u for u in self.ice.stun_urls if u != friend.stun_url],
                                    self.ice.turn_servers, self.ice.relay_only, failed=self.ice.failed)

    # --- envelopes ------------------------------------------------------------

    def set_identity(self, me):
        """A rotated key: it signs from now on, and at every signaling server's next registration."""
        self.me = me
        for client in [self.signal, *self.other_signals.values()]:
            client.identity = me

    def _seal(self, kind, to, session, body):
        self._counter += 1
        counter = self._counter
        # Always with the key chain: a stranger's request can be verified, and a
        # friend learns of a rotated key from whatever we send first.
        return identity.seal(self.me, kind, to, session, counter, body, include_chain=True)

    async def _send(self, kind, to, session, body, friend=None):
        """Seal and send; through friend's signaling server when it has one, else ours."""
        client = await self._signal_for(friend) if friend is not None else self.signal
        # The server acknowledges at once; the wait only bounds a slow server.
        await client.send_and_check(to, self._seal(kind, to, session, body), wait=SIGNAL_ACK_WAIT_S)

    async def _on_envelope(self, sender, data):
        try:
            friend = self.friends.lookup(sender)
            if friend is None or not friend.accepted:
                await self._from_stranger(sender, data, blocked=friend is not None)
                return
            envelope = identity.open_envelope(data, friend.chain, self.me.peer_id)
            self.replay.check(sender, envelope.session, envelope.counter)
            if envelope.chain is not friend.chain and envelope.chain.extends(friend.chain):
                self.friends.update_chain(sender, envelope.chain)
                friend.chain = envelope.chain
            self.friends.seen(sender)
            handler = {"offer": self._on_offer, "answer": self._on_answer,
                       "hangup": self._on_hangup, "refused": self._on_refused}.get(envelope.kind)
            if handler:
                await handler(friend, envelope)
        except AquapeerError as e:
            log.warning("refused an envelope from %s: %s", sender, e.message)

    async def _from_stranger(self, sender, data, blocked):
        chain = _envelope_chain(data)
        if chain is None or chain.peer_id != sender:
            raise identity.IdentityError("an envelope from a stranger without a valid key chain")
        envelope = identity.open_envelope(data, chain, self.me.peer_id)
        self.replay.check(sender, envelope.session, envelope.counter)
        if envelope.kind != "offer" or blocked:
            return
        self.friends.record_request(sender, str(envelope.body.get("name") or "")[:63], chain)
        # Strangers are free to make: refusing them must not spend what friends need.
        second = int(time.monotonic())
        sent = self._refusals[1] if self._refusals[0] == second else 0
        if sent < REFUSALS_PER_SECOND:
            self._refusals = (second, sent + 1)
            await self._send("refused", sender, envelope.session, {})

    async def _on_offer(self, friend, envelope):
        signal = await self._signal_for(friend)
        existing = self.links.get(friend.peer_id)
        if existing is not None and existing.session == envelope.session:
            return  # a copy of an offer we answer already
        if existing is not None:
            # Fresh from when it was sent: gathering may have taken seconds (a slow STUN or TURN
            # server), and both sides giving up their offers would leave two answerers.
            sent_at = existing.offered_at or time.monotonic()  # None: still gathering, not sent yet
            if (existing.state == "connecting" and existing.offerer and self.me.peer_id < friend.peer_id
                    and time.monotonic() - sent_at < OFFER_FRESH_S):
                # Both offered just now: ours wins, and the friend answers it.  It may never have
                # had it (a signaling connection that died unnoticed, as after a NAT's address
                # change, loses what it was given), so it gets it again: it answers the one that
                # comes first and ignores the other.
                if existing.offered_at is not None:
                    try:
                        await self._send_offer(friend, existing)
                    except AquapeerError:
                        pass
                return
            existing.close("replaced by a new connection from the friend")
        link = self._new_link(friend, envelope.session, offerer=False, signal=signal)
        try:
            sdp = await link.accept_offer(envelope.body["sdp"])
            await self._send("answer", friend.peer_id, envelope.session, {"sdp": sdp}, friend)
        except (AquapeerError, ValueError, KeyError) as e:
            log.warning("could not answer %s's offer: %s", friend.name, e)
            link.close(f"could not answer the friend's offer: {e}", failed=True)
            if isinstance(e, transport.NoCandidates):  # say so: the friend need not wait out its timeout
                try:
                    await self._send("hangup", friend.peer_id, envelope.session, {
                        "error": "it has no ICE candidates (its STUN or TURN servers failed, or no host address)"},
                        friend)
                except AquapeerError:
                    pass

    async def _on_answer(self, friend, envelope):
        link = self.links.get(friend.peer_id)
        if link is None or not link.offerer or link.session != envelope.session or link.pc is None:
            return
        try:
            await link.accept_answer(envelope.body["sdp"])
        except (ValueError, KeyError) as e:
            link.close(f"the friend's answer was unusable: {e}", failed=True)

    async def _on_hangup(self, friend, envelope):
        link = self.links.get(friend.peer_id)
        if link is not None and link.session == envelope.session:
            error = envelope.body.get("error")
            if isinstance(error, str):
                link.close(f"the friend could not answer: {error[:200]}", failed=True)
            else:
                link.close("the friend hung up")

    async def _on_refused(self, friend, envelope):
        link = self.links.get(friend.peer_id)
        if link is not None and link.session == envelope.session:
            link.close("refused: this peer has not accepted you as a friend", failed=True)

    # --- links ------------------------------------------------------------------

    def _new_link(self, friend, session, offerer, signal):
        link = transport.Link(self.me, friend.chain, session, offerer, self._ice_for(friend),
                              on_frame=self.on_frame, on_close=self._on_link_closed,
                              on_connected=self.on_connected, on_refused=self._on_frame_refused,
                              max_message_bytes=self.message_limit())
        link.friend_name = friend.name
        link.signal = signal  # the signaling client its offer and answer go through
        link.offered_at = None  # when our offer went out (monotonic)
        self.links[friend.peer_id] = link
        return link

    def _on_frame_refused(self, link, reason):
        now = time.monotonic()
        if now - self._refusals_logged.get(link.peer_id, -1e9) >= REFUSED_LOG_INTERVAL_S:
            self._refusals_logged[link.peer_id] = now
            log.warning("refused a frame from %s: %s (%d refused on this connection)",
                        link.friend_name, reason, link.frames_refused)

    def _on_link_closed(self, link):
        if self.links.get(link.peer_id) is link:
            del self.links[link.peer_id]
            self.last_closed[link.peer_id] = link
        if link.connected_since is not None and self.on_disconnected is not None:
            self.on_disconnected(link)

    async def _send_offer(self, friend, link):
        await self._send("offer", friend.peer_id, link.session,
                         {"sdp": link.pc.localDescription.sdp, "proto": [wire.PROTOCOL_MIN, wire.PROTOCOL_MAX],
                          "name": self.name() if callable(self.name) else self.name}, friend)

    async def _offer(self, friend, attempt=0):
        link = self._new_link(friend, os.urandom(16), offerer=True, signal=await self._signal_for(friend))
        try:
            await link.make_offer(attempt)
            link.offered_at = time.monotonic()
            await self._send_offer(friend, link)
        except PeerOffline:
            link.close(OFFLINE, failed=True)
        except AquapeerError as e:
            link.close(e.message, failed=True)
        return link

    async def connect(self, peer_id, timeout=15.0):
        """The connected link to a friend, made if need be; ConnectError naming the cause."""
        friend = self.friends.lookup(peer_id)
        if friend is None or not friend.accepted:
            raise ConnectError(f"unknown friend {peer_id}", hint="Add it first with peer.add_friend().")
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            link = self.links.get(peer_id)
            if link is None:
                remaining = deadline - time.monotonic()
                signal = await self._signal_for(friend)
                if not signal.connected and not await signal.wait_connected(max(0.0, remaining)):
                    raise ConnectError(f"not registered at the signaling server {signal.url}",
                                       detail=signal.last_error,
                                       hint="Check that the server is running and reachable.")
                link = await self._offer(friend)
            if link.state == "connected":
                return link
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectError(f"could not connect to {friend.name} within {timeout:g} s: "
                                   + (last_error or link.stalled_reason()))
            try:
                await asyncio.wait_for(asyncio.shield(link.verified), remaining)
            except TimeoutError:
                continue
            except transport.LinkClosed:
                last_error = link.last_error or "connection closed"
                if self.links.get(peer_id) is not None:
                    continue  # replaced by the friend's own offer
                if last_error == OFFLINE and deadline - time.monotonic() > OFFLINE_RETRY_S:
                    await asyncio.sleep(OFFLINE_RETRY_S)  # it may be registering again right now
                    continue
                if link.state == "failed":
                    raise ConnectError(f"could not connect to {friend.name}: {last_error}") from None

    def disconnect(self, peer_id):
        link = self.links.get(peer_id)
        if link is not None:
            link.close("disconnected on request")
            return True
        return False

    async def _supervise(self):
        """Retire links stuck negotiating, drop friends no longer accepted, and reconnect
        auto_connect friends with capped exponential backoff, a few offers per tick."""
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            if not self.signal.connected:
                continue
            now = time.monotonic()
            accepted = {f.peer_id: f for f in self.friends.accepted()}
            for peer_id, link in list(self.links.items()):
                if peer_id not in accepted:
                    link.close("no longer an accepted friend")
                elif link.state == "connecting" and now - link.created_at > NEGOTIATION_TIMEOUT_S:
                    link.close(f"{link.stalled_reason()} within {NEGOTIATION_TIMEOUT_S:.0f} s", failed=True)
            offers = 0
            for friend in accepted.values():
                link = self.links.get(friend.peer_id)
                if link is not None or not friend.auto_connect:
                    if link is not None and link.state == "connected":
                        self.attempts.pop(friend.peer_id, None)
                    continue
                failures, due = self.attempts.get(friend.peer_id, (0, 0.0))
                if now < due or offers >= OFFERS_PER_TICK:
                    continue
                offers += 1
                delay = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** failures) * random.uniform(0.8, 1.2)
                self.attempts[friend.peer_id] = (failures + 1, now + delay)
                asyncio.ensure_future(self._offer(friend, attempt=failures))
