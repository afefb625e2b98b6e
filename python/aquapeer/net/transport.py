"""WebRTC links between two peers: one aiortc peer connection and one data channel each.

What aiortc does not do, this module does:
- host candidates come from ``ice_host_addresses`` (aioice has no interface
  filter and always leaves loopback out), and the ICE sockets get large
  buffers (a burst of small sends overflows the 212 KB default);
- aiortc makes a fresh DTLS certificate per connection, so the offer and
  answer travel in envelopes signed by each side's identity key, and once
  the channel is open each side signs a transcript of both DTLS
  fingerprints on the channel before anything else flows;
- all channels of a connection share one send queue, so one writer with
  priorities keeps what it hands to aiortc under a small bound: control
  frames (pings) never wait behind bulk data;
- aiortc notices a dead peer only after ~30 s: application pings do it in
  a few seconds;
- aioice waits up to 5 s for a STUN or TURN server and drops the reason it
  failed: each query is bounded to 2 s and its failure recorded, and a link
  that lost a server to a failure gathers again at once with the next row.

Frames are validated by wire.decode before use; what fails, or comes faster
than a friend may send, is refused and counted, never acted on.
"""

import asyncio
import collections
import contextvars
import logging
import socket
import time

import aioice.ice
import aioice.stun
import aioice.turn
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from .. import identity
from ..errors import AquapeerError
from . import wire

ICE_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# Bytes handed to aiortc at most; the rest waits in our priority queues.
SEND_HIGH_WATER = 192 * 1024
PING_INTERVAL_S = 2.0
DEAD_AFTER_S = 7.0
CONTROL, BULK = 0, 1
# Frames a friend may send: a 5,000 messages a second stream needs ~100.
FRAMES_PER_SECOND = 2000
FRAME_BURST = 4000
# A STUN or TURN server answers within a round trip or two (aioice retransmits
# at 0.5 s and 1.5 s): one that has not within this is taken as unreachable.
SERVER_QUERY_TIMEOUT_S = 2.0
# A server that failed is passed over for this long while another row is left (then the
# preferred row is tried again); a STUN server, even when none is left: it is optional.
FAILED_SERVER_SKIP_S = 60.0

log = logging.getLogger("aquapeer.transport")

_original_get_host_addresses = aioice.ice.get_host_addresses
_original_relayed_candidate = aioice.ice.relayed_candidate
_original_server_reflexive_candidate = aioice.ice.server_reflexive_candidate
# The failures of STUN and TURN queries made while gathering, [(kind, reason)]: set
# by the gathering link; the tasks aioice starts for the queries inherit it.
_server_failures = contextvars.ContextVar("aquapeer_server_failures", default=None)


def configure_ice(host_addresses=None):
    """Offer exactly host_addresses as host candidates (None: every interface address)."""
    aioice.turn.UDP_SOCKET_BUFFER_SIZE = ICE_SOCKET_BUFFER_BYTES
    if host_addresses is None:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    chosen = [str(a) for a in host_addresses]

    def get_host_addresses(use_ipv4, use_ipv6):
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses


def server_failure_reason(exc):
    """Why a STUN or TURN query failed, in words; never with the credential."""
    if isinstance(exc, TimeoutError | aioice.stun.TransactionTimeout):
        return f"did not answer within {SERVER_QUERY_TIMEOUT_S:g} s"
    if isinstance(exc, aioice.stun.TransactionFailed):
        code, reason = exc.response.attributes.get("ERROR-CODE", (None, "no error code"))
        text = f"refused: {code} {reason}" if code else f"refused: {reason}"
        # aioice answers the first 401 (realm and nonce) itself: a second one refuses the credentials.
        return text + " (wrong username or credential)" if code == 401 else text
    if isinstance(exc, OSError) and exc.errno is not None:  # refused, no route, unknown host
        return f"could not be reached: {exc.strerror or exc}"
    return f"failed: {type(exc).__name__}: {exc}" if str(exc) else f"failed: {type(exc).__name__}"


async def _bounded_query(kind, query):
    failures = _server_failures.get()
    try:
        return await asyncio.wait_for(query, SERVER_QUERY_TIMEOUT_S)
    except Exception as e:
        if failures is not None:
            failures.append((kind, server_failure_reason(e)))
        raise


async def _relayed_candidate(**kwargs):
    return await _bounded_query("turn", _original_relayed_candidate(**kwargs))


async def _server_reflexive_candidate(protocol, stun_server):
    return await _bounded_query("stun", _original_server_reflexive_candidate(protocol, stun_server))


# aioice gathers with a 5 s bound and drops why a query failed (get_component_candidates
# keeps only the results without an exception); it calls these two module functions for
# its queries, so wrapping them is the one place to bound each query and learn the reason.
aioice.ice.relayed_candidate = _relayed_candidate
aioice.ice.server_reflexive_candidate = _server_reflexive_candidate


class IceServers:
    """STUN and TURN servers in order of preference.

    aiortc uses only the first STUN and the first TURN server it is given, so
    attempt n uses the n-th of each (wrapping), and a failed attempt moves on;
    a server that failed to answer or refused us is passed over for
    FAILED_SERVER_SKIP_S while another row is left (copies made with ``failed``
    share what failed).  When every TURN row failed lately, attempts go round
    them; when every STUN row did, none is used (host and relayed candidates
    do without, and a dead server would cost each link its query timeout).
    """

    def __init__(self, stun_urls=(), turn_servers=(), relay_only=False, failed=None):
        self.stun_urls = list(stun_urls)
        self.turn_servers = [tuple(t) for t in turn_servers]  # (url, username, credential)
        self.relay_only = relay_only
        # A STUN URL or a TURN row -> (when it last failed (monotonic), what happened).
        # Rows, not URLs: a corrected credential is often a second row for the same URL.
        self.failed = {} if failed is None else failed

    def _recent_failure(self, row, now):
        failure = self.failed.get(row)
        return failure[1] if failure and now - failure[0] < FAILED_SERVER_SKIP_S else None

    def _pick(self, rows, attempt, go_round):
        now = time.monotonic()
        for i in range(len(rows)):
            row = rows[(attempt + i) % len(rows)]
            if self._recent_failure(row, now) is None:
                return row
        return rows[attempt % len(rows)] if go_round and rows else None

    def servers(self, attempt=0):
        """(STUN URL, TURN row) that attempt uses; None where there is none to use."""
        return self._pick(self.stun_urls, attempt, False), self._pick(self.turn_servers, attempt, True)

    def passed_over(self, attempt=0):
        """What happened to the servers attempt passes over, for they failed lately."""
        now = time.monotonic()
        notes = []
        for rows, chosen in zip((self.stun_urls, self.turn_servers), self.servers(attempt), strict=True):
            for i in range(len(rows)):
                row = rows[(attempt + i) % len(rows)]
                if row == chosen:
                    break
                notes.append(f"{self._recent_failure(row, now)} {now - self.failed[row][0]:.0f} s ago")
        return notes

    def server_failed(self, row, what):
        """row failed: what says which server and how (never with the credential)."""
        self.failed[row] = (time.monotonic(), what)

    def server_worked(self, row):
        self.failed.pop(row, None)

    def configuration(self, attempt=0):
        stun_url, turn = self.servers(attempt)
        servers = []
        if stun_url:
            servers.append(RTCIceServer(urls=stun_url))
        if turn:
            url, username, credential = turn
            servers.append(RTCIceServer(urls=url, username=username, credential=credential))
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        # An empty list, not None: aiortc would otherwise ask Google's STUN server.
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def _ice_connection(pc):
    """aioice's Connection behind a peer connection (aiortc exposes no API for it)."""
    try:
        return pc.sctp.transport.transport.iceGatherer._connection
    except AttributeError:
        return None


def _grow_send_buffers(pc):
    connection = _ice_connection(pc)
    for protocol in getattr(connection, "_protocols", []):
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ICE_SOCKET_BUFFER_BYTES)


def candidate_types(pc):
    """(local, remote) candidate types of the nominated pair: host, srflx, prflx or relay."""
    connection = _ice_connection(pc)
    pair = next(iter(getattr(connection, "_nominated", {}).values()), None)
    if pair is None:
        return None, None
    return pair.local_candidate.type, pair.remote_candidate.type


class LinkClosed(AquapeerError):
    sqlstate = "08006"  # connection_failure


class NoCandidates(LinkClosed):
    """Gathering found no candidate at all: nothing to offer or answer with."""


class Link:
    """One authenticated data-channel connection to a friend."""

    def __init__(self, me, friend_chain, session, offerer, ice, on_frame=None, on_close=None,
                 on_connected=None, on_refused=None, max_message_bytes=16 * 1024 * 1024):
        self.me = me                      # identity.Identity
        self.friend_chain = friend_chain  # identity.KeyChain
        self.session = session            # bytes, shared by both sides
        self.offerer = offerer
        self.ice = ice
        self.on_frame = on_frame          # (link, frame) -> None
        self.on_close = on_close          # (link) -> None
        self.on_connected = on_connected  # (link) -> None, once both identities are verified
        self.on_refused = on_refused      # (link, reason) -> None
        self.max_message_bytes = max_message_bytes
        self.friend_max_message_bytes = None
        self.protocol = None
        self.frames_refused = 0
        self.last_refusal = None
        self.closed = asyncio.Event()
        self._reassembler = wire.Reassembler(max_message_bytes + wire.FRAGMENT_BYTES)
        self._rate = wire.RateLimit(FRAMES_PER_SECOND, FRAME_BURST)
        self.pc = None
        self._gathering = False
        self.channel = None
        self.state = "connecting"
        self.last_error = None
        self.connected_since = None
        self.bytes_sent = self.bytes_received = 0
        self.rtt_ms = None
        self.created_at = self.last_heard = time.monotonic()
        self.verified = asyncio.get_running_loop().create_future()
        self._queues = (collections.deque(), collections.deque())
        self._writable = asyncio.Event()
        self._tasks = []
        self._offer_fingerprints = self._answer_fingerprints = None
        self._friend_proved = False

    @property
    def peer_id(self):
        return self.friend_chain.peer_id

    # --- negotiation ------------------------------------------------------

    def _new_pc(self, attempt):
        self.pc = RTCPeerConnection(self.ice.configuration(attempt))
        self.channel = self.pc.createDataChannel("aquapeer", negotiated=True, id=0, ordered=True)
        self.channel.bufferedAmountLowThreshold = SEND_HIGH_WATER // 2
        self.channel.on("open", self._on_open)
        self.channel.on("message", self._on_message)
        self.channel.on("close", lambda: self.close("the data channel closed"))
        self.channel.on("bufferedamountlow", self._writable.set)
        self.pc.on("connectionstatechange", self._on_state)

    async def _describe(self, attempt, describe):
        """A peer connection and its local description (candidates gathered); while a
        STUN or TURN server fails and another row is left, again at once with that row.

        A server's failure is logged and kept in last_error (the link may still
        connect without it); with no candidate at all, LinkClosed says why.
        """
        tried = set()
        errors = self.ice.passed_over(attempt)
        while True:
            if self.state in ("closed", "failed"):
                break
            stun_url, turn = servers = self.ice.servers(attempt)
            tried.add(servers)
            self._new_pc(attempt)
            failures = []
            token = _server_failures.set(failures)
            self._gathering = True
            try:
                await describe()
            finally:
                self._gathering = False
                _server_failures.reset(token)
                if self.state in ("closed", "failed"):  # closed meanwhile: close() left the pc to us
                    await self.pc.close()
            failed = dict.fromkeys(failures)  # one query per host address may fail alike
            for kind, reason in failed:
                row, url = (stun_url, stun_url) if kind == "stun" else (turn, turn[0])
                what = f"{kind.upper()} server {url} {reason}"
                self.ice.server_failed(row, what)
                errors.append(what)
                log.warning("%s (connecting to %s)", what, getattr(self, "friend_name", self.peer_id))
            for kind, row in (("stun", stun_url), ("turn", turn)):
                if row is not None and kind not in {k for k, _ in failed}:
                    self.ice.server_worked(row)
            if not failed or self.state in ("closed", "failed") or self.ice.servers(attempt) in tried:
                break
            # Another row is left: drop this connection, quietly, and gather again.
            self.channel.remove_all_listeners()
            self.pc.remove_all_listeners()
            await self.pc.close()
        if errors:
            self.last_error = "; ".join(errors)
        if self.state in ("closed", "failed"):
            raise LinkClosed(self.last_error or "closed while gathering candidates")
        if "a=candidate:" not in self.pc.localDescription.sdp:
            raise NoCandidates("no ICE candidates: " + (self.last_error or "no host address, "
                                                                  "and no STUN or TURN server"))

    async def make_offer(self, attempt=0):
        async def describe():
            await self.pc.setLocalDescription(await self.pc.createOffer())

        await self._describe(attempt, describe)
        _grow_send_buffers(self.pc)
        self._offer_fingerprints = identity.sdp_fingerprints(self.pc.localDescription.sdp)
        return self.pc.localDescription.sdp

    async def accept_offer(self, sdp, attempt=0):
        async def describe():
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())

        self._offer_fingerprints = identity.sdp_fingerprints(sdp)
        await self._describe(attempt, describe)
        _grow_send_buffers(self.pc)
        self._answer_fingerprints = identity.sdp_fingerprints(self.pc.localDescription.sdp)
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp):
        self._answer_fingerprints = identity.sdp_fingerprints(sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def stalled_reason(self):
        """Why a link is still connecting: no answer yet, or no network path between the candidates."""
        if self._answer_fingerprints is None:
            return "no answer to the offer"
        return ("the offer was answered, but no network path between the two sides worked (behind NATs, "
                "add a STUN or TURN server: peer.stun_server, peer.turn_server)")

    def _transcript(self):
        return identity.fingerprint_transcript(self._offer_fingerprints, self._answer_fingerprints, self.session)

    def _on_open(self):
        # Prove, on the channel itself, that this DTLS session is ours.
        self._write_now({"t": "hello", "proto": [wire.PROTOCOL_MIN, wire.PROTOCOL_MAX],
                         "max_message_bytes": self.max_message_bytes,
                         "sig": identity.sign_transcript(self.me, self._transcript())})
        self._tasks.append(asyncio.ensure_future(self._pinger()))
        self._tasks.append(asyncio.ensure_future(self._writer()))

    def _on_state(self):
        if self.pc is not None and self.pc.connectionState == "failed":
            self.close("ICE failed: no candidate pair worked", failed=True)

    # --- frames -------------------------------------------------------------

    def refuse(self, reason):
        """Count a frame refused (malformed, unknown, too large, too many, or unusable)."""
        self.frames_refused += 1
        self.last_refusal = reason
        if self.on_refused is not None:
            self.on_refused(self, reason)

    def _on_message(self, data):
        self.bytes_received += len(data)
        self.last_heard = time.monotonic()
        if not self.verified.done():
            try:
                frame = wire.decode(data)
            except wire.WireError:
                frame = {}
            self._handshake(frame, frame.get("t"))
            return
        if not self._rate.allow():
            self.refuse(f"more than {FRAMES_PER_SECOND} frames a second")
            return
        try:
            frame = wire.decode(data)
            if frame["t"] == "frag":
                whole = self._reassembler.feed(frame)
                if whole is None:
                    return
                frame = wire.decode(whole, limit=None)
                if frame["t"] in ("frag", "hello", "verified"):
                    raise wire.WireError(f"a {frame['t']} frame inside fragments")
        except wire.WireError as e:
            self.refuse(e.message)
            return
        kind = frame["t"]
        if kind == "ping":
            self.send({"t": "pong", "at": frame["at"]}, CONTROL)
            self.rtt_ms = frame["rtt"]  # the offerer measures it for both
        elif kind == "pong":
            if isinstance(frame.get("at"), float):
                self.rtt_ms = round((time.monotonic() - frame["at"]) * 1000.0, 3)
        elif kind == "bye":
            self.close("the friend hung up")
        elif kind in ("hello", "verified"):
            self.refuse(f"a {kind} frame after the handshake")
        elif self.on_frame is not None:
            self.on_frame(self, frame)

    def _handshake(self, frame, kind):
        """hello: the friend proves its key; verified: the friend accepted our proof.

        Connected only when both have happened, so peer.connect returns once
        both identities are verified.
        """
        if not self._friend_proved:
            sig = frame.get("sig") if kind == "hello" else None
            if not isinstance(sig, bytes) or not identity.verify_transcript(
                    self.friend_chain, self._transcript(), sig):
                self.close("identity check failed: the friend did not prove its key on the channel", failed=True)
                return
            try:
                self.protocol = wire.negotiate(frame["proto"])
            except wire.WireError as e:
                self.close(e.message, failed=True)
                return
            self.friend_max_message_bytes = frame["max_message_bytes"]
            self._friend_proved = True
            self._write_now({"t": "verified"})
        elif kind == "verified":
            self.state = "connected"
            self.connected_since = time.time()
            self.verified.set_result(True)
            self._writable.set()
            if self.on_connected is not None:
                self.on_connected(self)
        else:
            self.close(f"protocol error: {kind!r} before the identity check ended", failed=True)

    def send(self, frame, priority=BULK):
        """Queue a frame; control frames go before bulk ones.  A frame too large
        for one message goes as fragments, in the bulk queue, so nothing that
        is not a fragment can come between them."""
        if self.state in ("closed", "failed"):
            raise LinkClosed(f"connection to {self.peer_id} is {self.state}")
        packets = wire.encode(frame)
        self._queues[priority if len(packets) == 1 else BULK].extend(packets)
        self._writable.set()

    def _write_now(self, frame):
        (data,) = wire.encode(frame)
        self.channel.send(data)
        self.bytes_sent += len(data)

    async def _writer(self):
        await self.verified
        while True:
            await self._writable.wait()
            self._writable.clear()
            while any(self._queues) and self.channel.bufferedAmount < SEND_HIGH_WATER:
                queue = self._queues[CONTROL] or self._queues[BULK]
                data = queue.popleft()
                self.channel.send(data)
                self.bytes_sent += len(data)

    async def _pinger(self):
        await self.verified
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            quiet = time.monotonic() - self.last_heard
            if quiet > DEAD_AFTER_S:
                self.close(f"no answer from the friend for {DEAD_AFTER_S:.0f} s", failed=True)
                return
            # Only a quiet link needs a ping, and only the offerer pings: its pings
            # and their pongs tell both sides the other is alive, at half the packets.
            if self.offerer and quiet >= PING_INTERVAL_S * 0.9:
                self.send({"t": "ping", "at": time.monotonic(), "rtt": self.rtt_ms}, CONTROL)

    # --- the end ------------------------------------------------------------

    def close(self, reason=None, failed=False):
        if self.state in ("closed", "failed"):
            return
        if self.state == "connected" and not failed and self.channel and self.channel.readyState == "open":
            try:
                self._write_now({"t": "bye"})
            except Exception:  # the channel may already be gone; closing anyway
                pass
        self.state = "failed" if failed else "closed"
        self.last_error = reason if failed else self.last_error
        self.closed.set()
        if not self.verified.done():
            self.verified.set_exception(LinkClosed(reason or "connection closed"))
            self.verified.exception()  # retrieved: nobody may be waiting
        for task in self._tasks:
            task.cancel()
        # aioice does not stop the STUN queries of a connection closed while it gathers
        # (their retransmissions then fail on a closed socket): _describe closes it after.
        if self.pc is not None and not self._gathering:
            asyncio.ensure_future(self.pc.close())
        if self.on_close is not None:
            self.on_close(self)

    def stats(self):
        local, remote = candidate_types(self.pc) if self.pc else (None, None)
        return {"state": self.state, "connected_since": self.connected_since, "rtt_ms": self.rtt_ms,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "local_candidate": local, "remote_candidate": remote, "last_error": self.last_error,
                "protocol": self.protocol, "frames_refused": self.frames_refused,
                "last_refusal": self.last_refusal}
