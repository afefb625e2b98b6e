"""The signaling (rendezvous) server and its client.

Peers find each other through a signaling server that is NOT trusted: it
only learns which peer ids are online and relays opaque envelopes between
them.  Peers sign their envelopes end to end (see :mod:`aquapeer.identity`),
so the server can drop or delay envelopes but never forge or alter them.
What the server does guarantee is that nobody registers under a peer id whose
key it does not hold: each connection proves its key by signing a fresh
challenge.

Protocol ``aquapeer-signal/1``: binary WebSocket frames, each one msgpack map
with a type ``t``::

    S->C  {"t": "challenge", "nonce": <32 bytes>, "proto": "aquapeer-signal/1"}
    C->S  {"t": "hello", "chain": <KeyChain wire>,
           "sig": sign(b"aquapeer-signal-hello/1\\0" + nonce)}
    S->C  {"t": "welcome", "id": <peer id>}
          | {"t": "error", "code": "auth", "message": ...} and close 4001
    C->S  {"t": "send", "to": <peer id>, "env": <bytes>, "ref": <int>, ["ack": true]}
    S->C  to the recipient:  {"t": "deliver", "from": <peer id>, "env": <bytes>}
          to the sender, when the recipient is not connected or its buffer is full:
                             {"t": "undeliverable", "to": <peer id>, "ref": <int>,
                              "reason": "offline" | "busy"}
          to the sender, when it asked for "ack" and the envelope was queued:
                             {"t": "queued", "ref": <int>}
          to the sender, over a rate limit or for a malformed send:
                             {"t": "error", "code": "rate" | "bad" | "unknown",
                              "ref": <int or None>, "message": ...}
    S->C  {"t": "error", "code": "replaced", ...} then close 4000: another
          connection registered the same peer id (the newest one wins).

Several instances behind a load balancer share registrations through Redis
(``serve(..., redis_url=...)``, ``aquapeer signal --redis``; see
:mod:`aquapeer.net.signal_cluster` and docs/signaling.md): the protocol and
the verdicts stay the same.

Close codes: 4000 replaced, 4001 authentication refused, 4002 no hello in
time, 4008 kept flooding over the rate limit, 1008 malformed frame, 1003 text
frame, 1009 frame over the size limit, 1013 server full, 1001 server going
away.  The server keeps nothing on disk and never looks inside ``env``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import itertools
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgpack
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.uri import parse_uri

from .. import identity as idmod
from ..errors import AquapeerError

log = logging.getLogger("aquapeer.signaling")
_ws_log = logging.getLogger("aquapeer.signaling.ws")

PROTO = "aquapeer-signal/1"
HELLO_CONTEXT = b"aquapeer-signal-hello/1\0"
NONCE_SIZE = 32

MAX_FRAME = 64 * 1024
# Room for the "send" map around the envelope (keys, peer id, ref).
FRAME_OVERHEAD = 512
MAX_ENVELOPE = MAX_FRAME - FRAME_OVERHEAD
MAX_PEER_ID_LEN = 128

CLOSE_REPLACED = 4000
CLOSE_AUTH = 4001
CLOSE_HELLO_TIMEOUT = 4002
CLOSE_FLOOD = 4008
CLOSE_MALFORMED = 1008
CLOSE_TEXT = 1003
CLOSE_FULL = 1013

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
FAILURES_BEFORE_FALLBACK = 3  # failed registrations in a row before trying the next server
HANDSHAKE_TIMEOUT_S = 10.0
MAX_PENDING_CALLBACKS = 256


# --- errors --------------------------------------------------------------------

class SignalingError(AquapeerError):
    """A problem talking to the signaling server."""

    sqlstate = "08006"  # connection_failure


class NotConnected(SignalingError):
    """The client is not registered at the signaling server right now."""


class Undeliverable(SignalingError):
    """The server could not pass an envelope on (``reason``: offline, busy)."""

    sqlstate = "08001"  # sqlclient_unable_to_establish_sqlconnection

    def __init__(self, message, *, to=None, ref=None, reason=None, **kw):
        super().__init__(message, **kw)
        self.to = to
        self.ref = ref
        self.reason = reason


class PeerOffline(Undeliverable):
    """The recipient is not connected to the signaling server."""


class RateLimited(SignalingError):
    """The server refused an envelope over its rate limit."""

    sqlstate = "53400"  # configuration_limit_exceeded


# --- wire helpers --------------------------------------------------------------

def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(frame: Any) -> dict | None:
    """A frame's map, or None for anything else (text, garbage, not a map)."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        return None
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises a zoo of types on hostile input
        return None
    return obj if isinstance(obj, dict) else None


def _is_ref(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst``."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, now: float, n: float = 1.0) -> bool:
        if self.refill(now) >= n:
            self.tokens -= n
            return True
        return False

    def full(self, now: float) -> bool:
        return self.refill(now) >= self.burst


# --- server --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Limits:
    """What one signaling server accepts.  New keys are free to make, so the
    per-connection and server-wide limits matter as much as the per-peer ones."""

    max_frame: int = MAX_FRAME              # bytes per WebSocket message (websockets max_size)
    rate_per_connection: float = 20.0       # frames a second, per connection ...
    burst_per_connection: float = 50.0      # ... with this burst
    rate_per_peer: float = 20.0             # envelopes a second per peer id (kept across reconnects)
    burst_per_peer: float = 50.0
    rate_total: float = 5000.0              # envelopes a second, whole server
    burst_total: float = 10000.0
    flood_strikes: int = 200                # refused-over-rate frames within ~10 s before closing
    max_connections: int = 10000            # open connections, authenticated or not
    max_pending: int = 256                  # connections that have not said hello yet
    accept_rate: float = 500.0              # new connections a second, whole server
    accept_burst: float = 2000.0
    hello_timeout: float = 5.0              # seconds for the WebSocket handshake and for hello
    ping_interval: float | None = 20.0   # websockets keepalive; a dead peer goes in ~40 s
    ping_timeout: float | None = 20.0
    send_buffer: int = 256 * 1024           # bytes queued towards one connection
    max_queue: int = 4                      # incoming frames websockets buffers per connection


class _Conn:
    """One WebSocket connection at the server, with a bounded send buffer."""

    __slots__ = ("ws", "serial", "peer_id", "out", "out_bytes", "wake", "limit", "bucket", "strikes",
                 "peer_bucket", "writer", "closing", "addr")

    def __init__(self, ws, serial: int, limits: Limits, now: float):
        self.ws = ws
        self.serial = serial  # tells this connection from a later one of the same peer id
        self.peer_id: str | None = None
        self.out: collections.deque = collections.deque()
        self.out_bytes = 0
        self.wake = asyncio.Event()
        self.limit = limits.send_buffer
        self.bucket = _Bucket(limits.rate_per_connection, limits.burst_per_connection, now)
        self.strikes = _Bucket(limits.flood_strikes / 10.0, limits.flood_strikes, now)
        self.peer_bucket: _Bucket | None = None
        self.writer: asyncio.Task | None = None
        self.closing = False
        try:
            addr = ws.remote_address
            self.addr = f"{addr[0]}:{addr[1]}" if addr else "?"
        except Exception:
            self.addr = "?"

    def push(self, frame: bytes) -> bool:
        """Queue a frame for this connection; False (dropped) if its buffer is full."""
        if self.closing or self.out_bytes + len(frame) > self.limit:
            return False
        self.out.append(frame)
        self.out_bytes += len(frame)
        self.wake.set()
        return True

    async def write_loop(self) -> None:
        try:
            while True:
                while not self.out:
                    self.wake.clear()
                    await self.wake.wait()
                frame = self.out.popleft()
                self.out_bytes -= len(frame)
                await self.ws.send(frame)
        except ConnectionClosed:
            pass

    def name(self) -> str:
        return f"{self.peer_id or 'unauthenticated'} ({self.addr})"


class SignalServer:
    """A running signaling server: the registry of connected peers and the
    relay between them.  Made by :func:`serve`; stop it with ``close()`` then
    ``await wait_closed()`` (or ``await aclose()``, or ``async with``).
    With ``redis_url`` it is one of several instances sharing registrations."""

    def __init__(self, limits: Limits = Limits(), redis_url: str | None = None):
        self.limits = limits
        self.cluster = None
        if redis_url:
            from .signal_cluster import Cluster  # redis only where it is used: not in the workers

            self.cluster = Cluster(redis_url, self, rate_per_peer=limits.rate_per_peer,
                                   burst_per_peer=limits.burst_per_peer)
        self._serials = itertools.count(1)
        now = time.monotonic()
        self._ws_server = None
        self._peers: dict[str, _Conn] = {}
        self._peer_buckets: dict[str, _Bucket] = {}
        self._total_bucket = _Bucket(limits.rate_total, limits.burst_total, now)
        self._accept_bucket = _Bucket(limits.accept_rate, limits.accept_burst, now)
        self._connections = 0
        self._pending = 0
        self._tasks: set = set()
        self._sweeper: asyncio.Task | None = None
        self.counters = collections.Counter(dict.fromkeys(
            ("registered", "delivered", "undeliverable", "rate_limited", "closed_flooding",
             "refused_auth", "refused_full", "hello_timeout"), 0))
        self.secure = False

    # -- lifecycle ---------------------------------------------------------------

    async def _start(self, host, port, ssl_context) -> SignalServer:
        lim = self.limits
        self.secure = ssl_context is not None
        if self.cluster is not None:
            await self.cluster.start()  # before listening: a peer must not register where Redis is not
        try:
            self._ws_server = await ws_serve(
                self._handler, host, port,
                ssl=ssl_context,
                process_request=self._process_request,
                compression=None,           # zlib state per connection costs memory; SDP is small
                open_timeout=lim.hello_timeout,
                ping_interval=lim.ping_interval,
                ping_timeout=lim.ping_timeout,
                close_timeout=2,
                max_size=lim.max_frame,
                max_queue=lim.max_queue,
                logger=_ws_log,
            )
        except BaseException:
            if self.cluster is not None:
                await self.cluster.close()
            raise
        self._sweeper = asyncio.ensure_future(self._sweep())
        log.info("signaling server listening on %s", ", ".join(self.urls))
        return self

    @property
    def sockets(self):
        return self._ws_server.sockets if self._ws_server else ()

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1]

    @property
    def urls(self) -> list[str]:
        scheme = "wss" if self.secure else "ws"
        out = []
        for sock in self.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}")
        return out

    def is_serving(self) -> bool:
        return self._ws_server is not None and self._ws_server.is_serving()

    def close(self) -> None:
        """Stop listening and close every connection (code 1001)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._ws_server is not None:
            self._ws_server.close()

    async def wait_closed(self) -> None:
        if self._ws_server is not None:
            await self._ws_server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self.cluster is not None:
            await self.cluster.close()
        log.info("signaling server stopped")

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> SignalServer:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        await self._ws_server.serve_forever()

    def stats(self) -> dict:
        out = {"connections": self._connections, "pending": self._pending,
               "peers": len(self._peers), **self.counters}
        if self.cluster is not None:
            out["cluster"] = self.cluster.stats()
        return out

    def local_peers(self) -> list[str]:
        """The peer ids registered at this instance."""
        return list(self._peers)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        """Forget the rate buckets of peers that left and whose bucket refilled."""
        while True:
            await asyncio.sleep(30)
            now = time.monotonic()
            for peer_id, bucket in list(self._peer_buckets.items()):
                if peer_id not in self._peers and bucket.full(now):
                    del self._peer_buckets[peer_id]

    # -- connections -------------------------------------------------------------

    def _process_request(self, connection, request):
        """Refuse a WebSocket upgrade with 503 when the server is full."""
        lim = self.limits
        if self._connections >= lim.max_connections or self._pending >= lim.max_pending:
            self.counters["refused_full"] += 1
            return connection.respond(503, "signaling server full, try again later\n")
        if not self._accept_bucket.take(time.monotonic()):
            self.counters["refused_full"] += 1
            return connection.respond(503, "too many new connections, try again later\n")
        return None

    async def _handler(self, ws) -> None:
        lim = self.limits
        conn = _Conn(ws, next(self._serials), lim, time.monotonic())
        self._connections += 1
        self._pending += 1
        pending = True
        try:
            if self._connections > lim.max_connections or self._pending > lim.max_pending:
                self.counters["refused_full"] += 1
                await ws.close(CLOSE_FULL, "server full")
                return
            peer_id = await self._authenticate(conn)
            if peer_id is None:
                return
            self._pending -= 1
            pending = False
            self._register(conn, peer_id)
            if self.cluster is not None:  # reachable from every instance once welcomed
                await self.cluster.register(peer_id)
            await ws.send(_pack({"t": "welcome", "id": peer_id}))
            conn.writer = asyncio.ensure_future(conn.write_loop())
            while True:
                frame = await ws.recv()
                if not await self._on_frame(conn, frame):
                    break
        except ConnectionClosed:
            pass
        finally:
            conn.closing = True
            if pending:
                self._pending -= 1
            self._connections -= 1
            if conn.writer is not None:
                conn.writer.cancel()
            if conn.peer_id is not None and self._peers.get(conn.peer_id) is conn:
                del self._peers[conn.peer_id]
                log.info("peer %s left", conn.name())
                if self.cluster is not None:
                    self._spawn(self.cluster.unregister(conn.peer_id))

    async def _authenticate(self, conn: _Conn) -> str | None:
        ws = conn.ws
        nonce = os.urandom(NONCE_SIZE)
        await ws.send(_pack({"t": "challenge", "nonce": nonce, "proto": PROTO}))
        try:
            frame = await asyncio.wait_for(ws.recv(), self.limits.hello_timeout)
        except TimeoutError:
            self.counters["hello_timeout"] += 1
            log.info("dropped %s: no hello within %g s", conn.name(), self.limits.hello_timeout)
            await ws.close(CLOSE_HELLO_TIMEOUT, "no hello in time")
            return None
        msg = _unpack(frame)
        if msg is None or msg.get("t") != "hello":
            return await self._refuse(conn, "expected a hello message")
        try:
            chain = idmod.KeyChain.from_wire(msg.get("chain"))
            peer_id = chain.peer_id
            key = chain.current_key
        except idmod.IdentityError as e:
            return await self._refuse(conn, f"invalid key chain: {e.message}")
        except Exception:  # a hostile chain must not kill the handler
            return await self._refuse(conn, "invalid key chain")
        sig = msg.get("sig")
        try:
            ok = isinstance(sig, bytes) and idmod.verify(key, sig, HELLO_CONTEXT + nonce)
        except Exception:
            ok = False
        if not ok:
            return await self._refuse(conn, f"the hello signature for {peer_id} does not match "
                                            "the key chain's current key")
        return peer_id

    async def _refuse(self, conn: _Conn, message: str) -> None:
        self.counters["refused_auth"] += 1
        log.warning("refused %s: %s", conn.name(), message)
        try:
            await conn.ws.send(_pack({"t": "error", "code": "auth", "message": message}))
        except ConnectionClosed:
            pass
        await conn.ws.close(CLOSE_AUTH, "authentication refused")
        return None

    def _register(self, conn: _Conn, peer_id: str) -> None:
        lim = self.limits
        conn.peer_id = peer_id
        bucket = self._peer_buckets.get(peer_id)
        if bucket is None:
            if len(self._peer_buckets) >= 2 * lim.max_connections:
                self._forget_idle_buckets()
            bucket = self._peer_buckets[peer_id] = _Bucket(lim.rate_per_peer, lim.burst_per_peer,
                                                           time.monotonic())
        conn.peer_bucket = bucket
        old = self._peers.get(peer_id)
        self._peers[peer_id] = conn
        self.counters["registered"] += 1
        if old is not None:
            log.info("peer %s reconnected; closing its previous connection (%s)", conn.name(), old.addr)
            old.closing = True
            self._spawn(self._kick(old, CLOSE_REPLACED, "replaced by a newer connection", REPLACED_ERROR))
        else:
            log.info("peer %s registered", conn.name())

    def _forget_idle_buckets(self) -> None:
        for peer_id in [p for p in self._peer_buckets if p not in self._peers]:
            del self._peer_buckets[peer_id]

    async def _kick(self, conn: _Conn, code: int, reason: str, msg: dict | None) -> None:
        try:
            if msg is not None:
                await asyncio.wait_for(conn.ws.send(_pack(msg)), 1.0)
        except (TimeoutError, ConnectionClosed):
            pass
        await conn.ws.close(code, reason)

    # -- frames ------------------------------------------------------------------

    async def _close_draining(self, conn: _Conn, code: int, reason: str) -> None:
        """Close a misbehaving connection, discarding what it still sends: with
        its frames left unread, websockets stops reading and would wait for
        the peer's close frame until close_timeout."""
        conn.closing = True
        closer = asyncio.ensure_future(conn.ws.close(code, reason))
        try:
            while not closer.done():
                await conn.ws.recv()
        except ConnectionClosed:
            pass
        await closer


    def _admit(self, conn: _Conn, now: float) -> bool:
        buckets = (conn.bucket, conn.peer_bucket, self._total_bucket)
        if all(b.refill(now) >= 1.0 for b in buckets):
            for b in buckets:
                b.tokens -= 1.0
            return True
        return False

    async def _on_frame(self, conn: _Conn, frame) -> bool:
        """Handle one frame of an authenticated connection; False to close it."""
        if not isinstance(frame, bytes):
            log.warning("closing %s: sent a text frame", conn.name())
            await self._close_draining(conn, CLOSE_TEXT, "binary frames only")
            return False
        msg = _unpack(frame)
        if msg is None:
            log.warning("closing %s: sent a malformed frame", conn.name())
            await self._close_draining(conn, CLOSE_MALFORMED, "malformed frame")
            return False
        ref = msg.get("ref")
        ref = ref if _is_ref(ref) else None
        now = time.monotonic()
        if not self._admit(conn, now):
            return await self._over_rate(conn, ref, now)
        kind = msg.get("t")
        if kind != "send":
            conn.push(_pack({"t": "error", "code": "unknown", "ref": ref,
                             "message": f"unknown message type {str(kind)[:32]!r}"}))
            return True
        to, env = msg.get("to"), msg.get("env")
        if (ref is None or not isinstance(to, str) or len(to) > MAX_PEER_ID_LEN
                or not isinstance(env, bytes)):
            conn.push(_pack({"t": "error", "code": "bad", "ref": ref,
                             "message": "a send needs a peer id 'to', bytes 'env' and an integer 'ref'"}))
            return True
        ack = msg.get("ack") is True
        target = self._peers.get(to)
        if self.cluster is not None:
            outcome = await self.cluster.route(conn.peer_id, conn.serial, to, env, ref, ack,
                                               local=target is not None)
            if outcome == "rate":  # the peer id's allowance, shared by every instance
                return await self._over_rate(conn, ref, time.monotonic())
            if outcome == "forwarded":  # its instance sends the verdict
                return True
            target = None if outcome == "offline" else self._peers.get(to)
        verdict = self._deliver(conn.peer_id, to, env, target)
        if verdict != "queued" or ack:
            conn.push(_verdict_frame(verdict, to, ref))
        return True

    async def _over_rate(self, conn: _Conn, ref: int | None, now: float) -> bool:
        """Refuse a frame over a rate limit; False once the connection is closed for flooding."""
        self.counters["rate_limited"] += 1
        conn.push(_pack({"t": "error", "code": "rate", "ref": ref,
                         "message": "over the rate limit; the envelope was dropped"}))
        if not conn.strikes.take(now):
            self.counters["closed_flooding"] += 1
            log.warning("closing %s: kept sending over the rate limit", conn.name())
            await self._close_draining(conn, CLOSE_FLOOD, "flooding")
            return False
        return True

    def _deliver(self, sender: str, to: str, env: bytes, target: _Conn | None) -> str:
        """Queue an envelope for a connection here: "queued", "offline" or "busy"."""
        if target is None:
            self.counters["undeliverable"] += 1
            return "offline"
        if not target.push(_pack({"t": "deliver", "from": sender, "env": env})):
            self.counters["undeliverable"] += 1
            log.debug("dropped an envelope from %s to %s: its buffer is full", sender, to)
            return "busy"
        self.counters["delivered"] += 1
        return "queued"

    # -- from other instances (signal_cluster) -----------------------------------

    def deliver_forwarded(self, msg: dict) -> None:
        """An envelope another instance passed on for a peer registered here."""
        sender, to, env = msg.get("from"), msg.get("to"), msg.get("env")
        if not (isinstance(sender, str) and isinstance(to, str) and isinstance(env, bytes)
                and _is_ref(msg.get("ref"))):
            log.warning("ignored a malformed envelope from instance %s", msg.get("origin"))
            return
        verdict = self._deliver(sender, to, env, self._peers.get(to))
        if verdict != "queued" or msg.get("ack") is True:
            self.cluster.send_verdict(msg, verdict)

    def deliver_verdict(self, msg: dict) -> None:
        """Another instance's verdict on an envelope a connection here sent."""
        conn = self._peers.get(msg.get("peer"))
        if conn is not None and conn.serial == msg.get("conn") and _is_ref(msg.get("ref")):
            conn.push(_verdict_frame(msg.get("verdict"), msg.get("to"), msg["ref"]))

    def drop_replaced(self, peer_id) -> None:
        """Another instance says peer_id registered there since: close it here, as replaced."""
        conn = self._peers.get(peer_id)
        if conn is not None:
            self._spawn(self._drop_replaced(conn))

    async def _drop_replaced(self, conn: _Conn) -> None:
        # The notice may be older than a registration here: Redis has the last word.
        if await self.cluster.still_mine(conn.peer_id) or self._peers.get(conn.peer_id) is not conn:
            return
        del self._peers[conn.peer_id]
        log.info("peer %s registered at another instance; closing its connection here", conn.name())
        conn.closing = True
        await self._kick(conn, CLOSE_REPLACED, "replaced by a newer connection", REPLACED_ERROR)


def _verdict_frame(verdict: str, to, ref: int) -> bytes:
    """What a sender is told of its envelope: queued, or undeliverable (offline, busy)."""
    if verdict == "queued":
        return _pack({"t": "queued", "ref": ref})
    return _pack({"t": "undeliverable", "to": to, "ref": ref, "reason": verdict})


REPLACED_ERROR = {"t": "error", "code": "replaced", "message": "another connection registered this peer id"}


async def serve(host, port, *, ssl_context: ssl.SSLContext | None = None,
                limits: Limits = Limits(), redis_url: str | None = None) -> SignalServer:
    """Start a signaling server on ``host``:``port`` (port 0: any free port); with
    ``redis_url``, one of several instances sharing registrations through Redis
    (signal_cluster.ClusterError when Redis cannot be reached)."""
    return await SignalServer(limits, redis_url)._start(host, port, ssl_context)


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def _serve_until_signalled(host, port, ssl_context, limits, redis_url) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = await serve(host, port, ssl_context=ssl_context, limits=limits, redis_url=redis_url)
    except BaseException:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        raise
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await server.aclose()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run_server(host: str, port: int, cert: str | None = None, key: str | None = None,
               limits: Limits = Limits(), redis_url: str | None = None) -> None:
    """Run a signaling server until SIGINT or SIGTERM (blocking; for the CLI).
    ``cert`` and ``key`` (PEM files) together make it serve wss://; ``redis_url``
    makes it one of several instances sharing registrations."""
    if (cert is None) != (key is None):
        raise ValueError("give both cert and key, or neither")
    ssl_context = server_ssl_context(cert, key) if cert else None
    asyncio.run(_serve_until_signalled(host, port, ssl_context, limits, redis_url))


# --- client --------------------------------------------------------------------

class _Refused(Exception):
    pass


class _Replaced(Exception):
    pass


Callback = Callable[..., None | Awaitable[None]]


class SignalClient:
    """A peer's registration at a signaling server, kept up by reconnecting.

    ``on_envelope(from_peer_id, env)`` is called for each envelope delivered;
    a plain function is called in order from the reader, a coroutine function
    runs as a task (up to 256 at once; beyond that deliveries are dropped and
    logged), so a slow handler never stalls the connection.
    ``on_state(state)`` sees "connecting", "connected", "disconnected",
    "replaced" (another process registered this peer id; the client stops) and
    "closed".  ``on_undeliverable(to, ref, reason)`` sees the server's notices
    for envelopes sent with :meth:`send`.
    """

    def __init__(self, url: str, identity, on_envelope: Callback, *,
                 ssl_context: ssl.SSLContext | None = None,
                 on_state: Callback | None = None,
                 on_undeliverable: Callback | None = None,
                 open_timeout: float = HANDSHAKE_TIMEOUT_S,
                 ping_interval: float | None = 20.0,
                 ping_timeout: float | None = 20.0,
                 fallback_urls: Sequence[str] = ()):
        try:
            secure = parse_uri(url).secure
        except InvalidURI as e:
            raise SignalingError(f"invalid signaling server URL {url!r}",
                                 hint="Use ws://host:port or wss://host:port.", detail=str(e)) from None
        if ssl_context is not None and not secure:
            raise SignalingError(f"an SSL context was given for {url}, which is not a wss:// URL",
                                 hint="Use a wss:// URL, or no SSL context.")
        self.url = url
        # Servers to move on to, in order, when this one cannot be reached.
        self.urls = [url] + [u for u in fallback_urls if u != url]
        self.identity = identity  # read at every (re)connection: a rotated identity takes effect then
        self.on_envelope = on_envelope
        self.on_state = on_state
        self.on_undeliverable = on_undeliverable
        self._connect_kw: dict = dict(open_timeout=open_timeout, ping_interval=ping_interval,
                                      ping_timeout=ping_timeout, close_timeout=2, compression=None,
                                      max_size=2 * MAX_FRAME, max_queue=16, logger=_ws_log)
        if secure and ssl_context is not None:
            self._connect_kw["ssl"] = ssl_context
        self.state = "idle"
        self.last_error: str | None = None
        self.reconnects = 0
        self._ws = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._connected = asyncio.Event()
        self._refs = itertools.count(1)
        self._waiters: dict[int, asyncio.Future] = {}
        self._callbacks: set = set()

    # -- public ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == "connected" and self._ws is not None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def start(self, timeout: float = 5.0) -> bool:
        """Start connecting (and reconnecting for as long as the client lives);
        wait up to ``timeout`` s for the first registration.  True if registered;
        False means it keeps trying in the background (see ``last_error``)."""
        if self._closing:
            raise SignalingError("this signaling client was closed")
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        if timeout and not self.connected:
            waiter = asyncio.ensure_future(self._connected.wait())
            try:
                await asyncio.wait({waiter, self._task}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        return self.connected

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            pass
        return self.connected

    async def send(self, to_peer_id: str, env: bytes) -> int:
        """Send an envelope to a peer through the server; returns its ``ref``
        once the frame is written.  NotConnected if not registered right now.
        Notices that the peer was offline go to ``on_undeliverable``."""
        return await self._send(to_peer_id, env, None)

    async def send_and_check(self, to_peer_id: str, env: bytes, wait: float = 0.3) -> None:
        """Send an envelope and wait up to ``wait`` s for the server's verdict:
        returns as soon as it reports the envelope queued for the recipient;
        PeerOffline if the recipient is not connected, Undeliverable if its
        buffer is full, RateLimited over the rate limit.  No verdict within
        ``wait`` counts as sent."""
        fut = asyncio.get_running_loop().create_future()
        ref = await self._send(to_peer_id, env, fut)
        try:
            verdict = await asyncio.wait_for(fut, wait)
        except TimeoutError:
            log.debug("no verdict for envelope %s to %s within %g s", ref, to_peer_id, wait)
            return
        finally:
            self._waiters.pop(ref, None)
        if isinstance(verdict, Exception):
            raise verdict

    async def close(self) -> None:
        """Unregister and stop reconnecting."""
        self._closing = True
        task, self._task = self._task, None
        ws = self._ws
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 3)
            except (TimeoutError, ConnectionClosed):
                pass
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for task in list(self._callbacks):
            task.cancel()
        self._fail_waiters()
        self._set_state("closed")

    async def __aenter__(self) -> SignalClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------

    def _not_connected(self) -> NotConnected:
        if self.state == "replaced":
            return NotConnected(
                "not registered at the signaling server: another process registered the same peer id",
                hint="Two nodes share this identity; stop one of them (a cloned database keeps its identity).")
        detail = self.last_error
        return NotConnected(f"not connected to the signaling server {self.url}",
                            hint="The client reconnects by itself; check that the server is running "
                                 "and reachable.", detail=detail)

    async def _send(self, to_peer_id, env, waiter: asyncio.Future | None) -> int:
        to = idmod.parse_peer_id(to_peer_id)
        if not isinstance(env, (bytes, bytearray, memoryview)):
            raise TypeError("an envelope is bytes")
        env = bytes(env)
        if len(env) > MAX_ENVELOPE:
            raise SignalingError(f"envelope of {len(env)} bytes is over the signaling limit "
                                 f"of {MAX_ENVELOPE} bytes", sqlstate="54000")
        ws = self._ws
        if ws is None or self.state != "connected":
            raise self._not_connected()
        ref = next(self._refs)
        msg = {"t": "send", "to": to, "env": env, "ref": ref}
        if waiter is not None:
            msg["ack"] = True
            self._waiters[ref] = waiter  # before the frame leaves: the verdict may come at once
        try:
            await ws.send(_pack(msg))
        except ConnectionClosed:
            self._waiters.pop(ref, None)
            raise self._not_connected() from None
        except BaseException:
            self._waiters.pop(ref, None)
            raise
        return ref

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        if state == "connected":
            self._connected.set()
        else:
            self._connected.clear()
        if self.on_state is not None:
            self._call(self.on_state, state)

    def _call(self, callback, *args) -> None:
        try:
            result = callback(*args)
        except Exception:
            log.exception("signaling callback %r failed", callback)
            return
        if inspect.isawaitable(result):
            if len(self._callbacks) >= MAX_PENDING_CALLBACKS:
                log.warning("dropped a signaling callback: %d still running", len(self._callbacks))
                if inspect.iscoroutine(result):
                    result.close()
                return
            task = asyncio.ensure_future(result)
            self._callbacks.add(task)
            task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Task) -> None:
        self._callbacks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("signaling callback failed", exc_info=task.exception())

    def _fail_waiters(self) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(None)  # no verdict: the connection went away
        self._waiters.clear()

    async def _run(self) -> None:
        delay = BACKOFF_FIRST_S
        failures = 0  # failed attempts in a row; the first one is logged as a warning
        lost_here = False  # the registration at self.url was lost and not yet made again
        while not self._closing:
            self._set_state("connecting")
            registered = replaced = False
            try:
                async with ws_connect(self.url, **self._connect_kw) as ws:
                    await asyncio.wait_for(self._handshake(ws), HANDSHAKE_TIMEOUT_S)
                    registered = True
                    self._ws = ws
                    self.last_error = None
                    self._set_state("connected")
                    log.info("registered at %s as %s", self.url, self.identity.peer_id)
                    await self._read_loop(ws)
            except _Replaced:
                replaced = True
            except _Refused as e:
                self.last_error = f"the signaling server refused this peer: {e}"
                delay = BACKOFF_MAX_S
            except ConnectionClosed as e:
                rcvd = e.rcvd
                replaced = rcvd is not None and rcvd.code == CLOSE_REPLACED
                if rcvd is None:
                    self.last_error = "connection lost"
                else:
                    self.last_error = f"connection closed with code {rcvd.code}" + (
                        f" ({rcvd.reason})" if rcvd.reason else "")
            except (TimeoutError, OSError, InvalidHandshake, ValueError) as e:
                self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except Exception as e:  # keep the registration loop alive whatever happens
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("signaling client error")
            finally:
                self._ws = None
                self._fail_waiters()
            if self._closing:
                break
            if replaced:
                self.last_error = "another process registered the same peer id"
                log.warning("signaling: %s at %s; this client stops (two nodes share an identity?)",
                            self.last_error, self.url)
                self._set_state("replaced")
                return
            self._set_state("disconnected")
            if registered:
                delay, failures, lost_here = BACKOFF_FIRST_S, 0, True
                log.info("lost the signaling server %s (%s); reconnecting", self.url, self.last_error)
            else:
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "could not register at %s: %s; retrying with backoff", self.url, self.last_error)
                # A server that dropped us and does not take us back is down: move on at
                # once (instances sharing a registry take its peers over); otherwise after
                # a few tries, in case it was a passing failure.
                if len(self.urls) > 1 and (lost_here or failures % FAILURES_BEFORE_FALLBACK == 0):
                    lost_here = False
                    self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
                    log.warning("moving on to the signaling server %s", self.url)
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.75, 1.0))  # jitter, never over the cap
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _handshake(self, ws) -> None:
        msg = _unpack(await ws.recv())
        if msg is None or msg.get("t") != "challenge":
            raise _Refused("expected a challenge from the server")
        if msg.get("proto") != PROTO:
            raise _Refused(f"unsupported protocol {msg.get('proto')!r} (this client speaks {PROTO})")
        nonce = msg.get("nonce")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise _Refused("malformed challenge")
        me = self.identity
        await ws.send(_pack({"t": "hello", "chain": me.chain.to_wire(),
                             "sig": me.sign(HELLO_CONTEXT + nonce)}))
        msg = _unpack(await ws.recv())
        if msg is None:
            raise _Refused("malformed reply to hello")
        if msg.get("t") == "error":
            raise _Refused(str(msg.get("message") or msg.get("code")))
        if msg.get("t") != "welcome" or msg.get("id") != me.peer_id:
            raise _Refused(f"unexpected reply to hello: {msg.get('t')!r}")

    async def _read_loop(self, ws) -> None:
        while True:
            msg = _unpack(await ws.recv())
            if msg is None:
                log.warning("signaling: ignored a malformed frame from the server")
                continue
            kind = msg.get("t")
            if kind == "deliver":
                sender, env = msg.get("from"), msg.get("env")
                if isinstance(sender, str) and isinstance(env, bytes):
                    self._call(self.on_envelope, sender, env)
            elif kind == "undeliverable":
                self._verdict(msg, msg.get("ref"))
            elif kind == "queued":
                fut = self._waiters.pop(msg.get("ref"), None) if _is_ref(msg.get("ref")) else None
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif kind == "error":
                if msg.get("code") == "replaced":
                    raise _Replaced()
                self._verdict(msg, msg.get("ref"))
            else:
                log.debug("signaling: ignored a %r message", kind)

    def _verdict(self, msg: dict, ref) -> None:
        kind, to = msg.get("t"), msg.get("to")
        if kind == "undeliverable":
            reason = str(msg.get("reason") or "offline")
            cls = PeerOffline if reason == "offline" else Undeliverable
            text = ("peer %s is not connected to the signaling server" if reason == "offline"
                    else "the signaling server could not pass the envelope on to %s (" + reason + ")")
            exc: Exception = cls(text % to, to=to, ref=ref, reason=reason,
                                 hint="It may be offline; it is tried again when it comes back.")
        elif msg.get("code") == "rate":
            exc = RateLimited("the signaling server refused an envelope over its rate limit",
                              hint="Send fewer envelopes a second.")
        else:
            exc = SignalingError(f"the signaling server reported: {msg.get('message') or msg.get('code')}",
                                 sqlstate="08P01")
        fut = self._waiters.pop(ref, None) if _is_ref(ref) else None
        if fut is not None:
            if not fut.done():
                fut.set_result(exc)
        elif kind == "undeliverable":
            if self.on_undeliverable is not None:
                self._call(self.on_undeliverable, to, ref, getattr(exc, "reason", None))
            else:
                log.debug("signaling: envelope %s to %s undeliverable", ref, to)
        else:
            log.warning("signaling: %s", exc.message)
