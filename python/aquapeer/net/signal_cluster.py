"""Several signaling instances sharing one registry through Redis.

``aquapeer signal --redis redis://host:6379/0``: instances behind any TCP
load balancer, each with a random instance id, share who is registered where
and pass envelopes on to each other.  Redis holds (all keys under
``aquapeer:signal:``):

- ``peer:<peer id>`` -> the instance id the peer is registered at, written at
  registration (the last registration wins: the previous instance is told,
  and closes its connection as "replaced", as a single server does), deleted
  when the peer leaves, with a 10-minute TTL the instance refreshes so that a
  dead instance's keys do not stay for ever;
- ``instance:<instance id>``: the instance is alive (TTL 5 s, refreshed every
  second).  A peer whose instance is gone counts as offline at once (its
  subscription is gone, so PUBLISH reaches nobody) or, when the instance is
  cut off rather than dead, within 5 s;
- ``rate:<peer id>``: the peer id's token bucket, so that a peer connected to
  several instances at once gets the rate of one (the same rate and burst as
  a single server's per-peer bucket, on Redis's clock).

Each instance subscribes to its own channel ``instance:<instance id>``.  An
envelope for a peer registered elsewhere goes there in one round trip (a Lua
script: take a token, look the recipient up, PUBLISH), and the receiving
instance answers with the verdict the sender asked for (queued, offline,
busy).  Every forwarded envelope carries (origin instance, sequence number)
and an instance drops one it has seen, so no envelope is delivered twice,
whatever retried it.

Redis lost while running: the instance keeps serving the peers connected to
it (envelopes between them; everyone else counts as offline, per-peer rates
are its own), logs a warning, and when Redis answers again re-registers its
peers and goes on.  Nothing of this is trusted more than the server itself:
envelopes stay signed end to end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import urllib.parse

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..errors import AquapeerError

log = logging.getLogger("aquapeer.signaling.cluster")

PREFIX = "aquapeer:signal:"
PEER_TTL_S = 600                # a peer key's TTL: only for keys a dead instance left behind
PEER_REFRESH_S = PEER_TTL_S / 3
INSTANCE_TTL_MS = 5000          # how long an instance counts as alive after its last heartbeat
HEARTBEAT_S = 1.0
REDIS_TIMEOUT_S = 2.0           # connect and reply; a Redis that takes longer counts as lost
RECONNECT_MAX_S = 2.0           # between attempts to reach a lost Redis
POOL_CONNECTIONS = 32           # Redis connections of one instance (one more for its subscription)
CLAIM_BATCH = 1000              # peer keys a pipeline writes at once
ROUTE_BATCH = 500               # envelopes routed in one pipeline
OUTBOX_MAX = 10000              # notices waiting to be published; beyond that the oldest are dropped
DEDUPE_WINDOW = 65536           # forwarded envelopes remembered to drop a second copy

# Take one token from the sender's bucket; then, if a message is given, look up
# the recipient and PUBLISH to its instance.  Replies: ok (token taken, nothing
# to forward), rate, offline, local (registered at this instance), forwarded.
ROUTE_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(bucket[1]) or burst
local stamp = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
if tokens < 1 then return 'rate' end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'stamp', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
if ARGV[4] == '' then return 'ok' end
local owner = redis.call('GET', KEYS[2])
if not owner then return 'offline' end
if owner == ARGV[3] then return 'local' end
if redis.call('EXISTS', ARGV[5] .. owner) == 0 then return 'offline' end
if redis.call('PUBLISH', ARGV[5] .. owner, ARGV[4]) == 0 then return 'offline' end
return 'forwarded'
"""

# Delete a peer key only while it still names this instance.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ClusterError(AquapeerError):
    """Redis, which the signaling instances share, cannot be used."""

    sqlstate = "08006"


def redacted(url: str) -> str:
    """A Redis URL without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def peer_key(peer_id: str) -> str:
    return f"{PREFIX}peer:{peer_id}"


def instance_channel(instance_id: str) -> str:
    return f"{PREFIX}instance:{instance_id}"


class Cluster:
    """One signaling instance's part in the shared registry.

    ``server`` is the SignalServer; the cluster calls its ``deliver_forwarded(msg)``,
    ``deliver_verdict(msg)``, ``drop_replaced(peer_id)`` and reads ``local_peers()``."""

    def __init__(self, url: str, server, *, rate_per_peer: float, burst_per_peer: float):
        self.url = url
        self.server = server
        self.instance_id = os.urandom(8).hex()
        self.channel = instance_channel(self.instance_id)
        self.rate_per_peer, self.burst_per_peer = rate_per_peer, burst_per_peer
        self.healthy = False
        self.counters = collections.Counter(dict.fromkeys(
            ("forwarded", "received", "duplicates", "redis_errors", "outbox_dropped"), 0))
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=POOL_CONNECTIONS + 1, timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0))  # a retried PUBLISH could deliver twice; we handle failures
        except ValueError as e:
            raise ClusterError(f"invalid Redis URL {redacted(url)!r}: {e}",
                               hint="Use redis://host:port/db (or rediss:// for TLS, "
                                    "redis://:password@host:port/db with a password).") from None
        self.redis = aioredis.Redis(connection_pool=pool)
        self._route = self.redis.register_script(ROUTE_SCRIPT)
        self._release = self.redis.register_script(RELEASE_SCRIPT)
        self._sequence = 0
        self._seen: set = set()
        self._seen_order: collections.deque = collections.deque()
        self._outbox: collections.deque = collections.deque()
        self._outbox_wake = asyncio.Event()
        self._routes: collections.deque = collections.deque()  # (keys, args, future) waiting for Redis
        self._routes_wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Reach Redis and subscribe, or ClusterError naming the URL and the fix."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            await self.redis.aclose()
            raise ClusterError(
                f"cannot reach Redis at {redacted(self.url)}: {e}",
                hint="Start Redis there (redis-server), or give --redis the URL of a running one "
                     "(redis://host:port/db); without --redis the signaling server runs alone.") from None
        self._tasks = [asyncio.ensure_future(task) for task in (self._keep(), self._flush(), self._router())]
        try:
            await asyncio.wait_for(self._subscribed.wait(), 2 * REDIS_TIMEOUT_S + 1)
        except TimeoutError:
            await self.close()
            raise ClusterError(f"Redis at {redacted(self.url)} answered, but subscribing to its "
                               "channel did not work", hint="Check the Redis server's log.") from None
        log.info("instance %s shares its registrations through Redis at %s",
                 self.instance_id, redacted(self.url))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.healthy:
            try:  # this instance's peers count as offline at once, not in INSTANCE_TTL_MS
                await self.redis.delete(self.channel)
            except (RedisError, OSError):
                pass
        await self.redis.aclose()

    def stats(self) -> dict:
        return {"instance": self.instance_id, "redis": "ok" if self.healthy else "lost", **self.counters}

    # -- registrations -------------------------------------------------------------

    async def register(self, peer_id: str) -> None:
        """Record that peer_id is registered here, telling the instance it was at before.
        Without Redis the registration is local, and claimed when Redis is back."""
        if self.healthy:
            try:
                await self._guarded(self._claim([peer_id]))
            except ClusterError:
                pass

    async def unregister(self, peer_id: str) -> None:
        if self.healthy:
            try:
                await self._guarded(self._release(keys=[peer_key(peer_id)], args=[self.instance_id]))
            except ClusterError:
                pass

    async def still_mine(self, peer_id: str) -> bool:
        """Whether Redis still has peer_id registered here (True when Redis cannot tell)."""
        if not self.healthy:
            return True
        try:
            owner = await self._guarded(self.redis.get(peer_key(peer_id)))
        except ClusterError:
            return True
        return owner is None or owner.decode() == self.instance_id

    async def _claim(self, peer_ids) -> None:
        for start in range(0, len(peer_ids), CLAIM_BATCH):
            batch = peer_ids[start:start + CLAIM_BATCH]
            pipe = self.redis.pipeline(transaction=False)
            for peer_id in batch:
                pipe.set(peer_key(peer_id), self.instance_id, ex=PEER_TTL_S, get=True)
            previous = await pipe.execute()
            for peer_id, owner in zip(batch, previous, strict=True):
                if owner is not None and owner.decode() != self.instance_id:
                    self._post(owner.decode(), {"k": "replaced", "peer": peer_id})

    # -- envelopes -----------------------------------------------------------------

    async def route(self, sender: str, conn_serial: int, to: str, env: bytes, ref: int, ack: bool,
                    *, local: bool) -> str:
        """Take a token from sender's shared bucket and, unless the recipient is
        connected here, pass the envelope on to its instance.  "ok" or "local":
        deliver here; "rate"; "offline"; "forwarded"; "lost": Redis cannot be
        used, so deliver here if the recipient is here, else it is offline."""
        if not self.healthy:
            return "lost"
        message = b""
        if not local:
            self._sequence += 1
            message = _pack({"k": "env", "origin": self.instance_id, "seq": self._sequence,
                             "from": sender, "conn": conn_serial, "to": to, "env": env,
                             "ref": ref, "ack": ack})
        outcome = asyncio.get_running_loop().create_future()
        self._routes.append(([f"{PREFIX}rate:{sender}", peer_key(to)],
                             [self.rate_per_peer, self.burst_per_peer, self.instance_id, message,
                              f"{PREFIX}instance:"], outcome))
        self._routes_wake.set()
        outcome = await outcome
        if outcome == "forwarded":
            self.counters["forwarded"] += 1
        return outcome

    async def _router(self) -> None:
        """Run the route script for every envelope waiting, many to a pipeline: one
        round trip each costs the instance more CPU than the rest of the envelope's way."""
        while True:
            while not self._routes:
                self._routes_wake.clear()
                await self._routes_wake.wait()
            batch = [self._routes.popleft() for _ in range(min(len(self._routes), ROUTE_BATCH))]
            try:
                outcomes = await self._run_routes([(keys, args) for keys, args, _ in batch])
            except ClusterError:
                outcomes = ["lost"] * len(batch)
            except Exception:  # the senders must hear back whatever happens
                log.exception("routing envelopes through Redis failed")
                outcomes = ["lost"] * len(batch)
            for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)

    async def _run_routes(self, calls) -> list[str]:
        """EVALSHA the route script once per call in one pipeline.  Not through redis-py's
        Script, which asks SCRIPT EXISTS before every pipeline: the script is loaded when
        Redis says it lacks it (a restarted Redis), and only the calls it refused run again."""
        results = await self._evalsha_pipeline(calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await self._guarded(self.redis.script_load(ROUTE_SCRIPT))
            for i, result in zip(missing, await self._evalsha_pipeline([calls[i] for i in missing]), strict=True):
                results[i] = result
        outcomes = []
        for result in results:
            if isinstance(result, Exception):
                log.error("the route script failed in Redis: %s", result)
                outcomes.append("lost")
            else:
                outcomes.append(result.decode())
        return outcomes

    async def _evalsha_pipeline(self, calls) -> list:
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._route.sha, len(keys), *keys, *args)
        return await self._guarded(pipe.execute(raise_on_error=False))

    def send_verdict(self, msg: dict, verdict: str) -> None:
        """Tell the instance a forwarded envelope came from what became of it."""
        self._post(msg["origin"], {"k": "verdict", "peer": msg["from"], "conn": msg["conn"],
                                   "to": msg["to"], "ref": msg["ref"], "verdict": verdict})

    def _first_time(self, msg: dict) -> bool:
        """False for a forwarded envelope already seen (a retried or repeated PUBLISH)."""
        envelope_id = (msg.get("origin"), msg.get("seq"))
        if envelope_id in self._seen:
            return False
        self._seen.add(envelope_id)
        self._seen_order.append(envelope_id)
        if len(self._seen_order) > DEDUPE_WINDOW:
            self._seen.discard(self._seen_order.popleft())
        return True

    def _on_message(self, data: bytes) -> None:
        try:
            msg = msgpack.unpackb(data, raw=False)
        except Exception:  # another program publishing on our channel
            log.warning("ignored a malformed message on %s", self.channel)
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("k")
        if kind == "env":
            if not self._first_time(msg):
                self.counters["duplicates"] += 1
                log.debug("dropped a second copy of envelope %s/%s", msg.get("origin"), msg.get("seq"))
                return
            self.counters["received"] += 1
            self.server.deliver_forwarded(msg)
        elif kind == "verdict":
            self.server.deliver_verdict(msg)
        elif kind == "replaced":
            self.server.drop_replaced(msg.get("peer"))

    # -- notices to other instances --------------------------------------------------

    def _post(self, instance_id: str, msg: dict) -> None:
        if not self.healthy:
            return
        if len(self._outbox) >= OUTBOX_MAX:
            self._outbox.popleft()
            self.counters["outbox_dropped"] += 1
        self._outbox.append((instance_channel(instance_id), _pack(msg)))
        self._outbox_wake.set()

    async def _flush(self) -> None:
        """Publish posted notices, many to a round trip."""
        while True:
            while not self._outbox:
                self._outbox_wake.clear()
                await self._outbox_wake.wait()
            pipe = self.redis.pipeline(transaction=False)
            for _ in range(min(len(self._outbox), CLAIM_BATCH)):
                pipe.publish(*self._outbox.popleft())
            try:
                await self._guarded(pipe.execute())
            except ClusterError:
                pass  # lost with Redis: the senders' waits count the envelopes as sent

    # -- keeping Redis -------------------------------------------------------------------

    async def _guarded(self, awaitable):
        """Await a Redis call; a failure marks Redis lost (the keeper takes it back) and
        raises ClusterError."""
        try:
            return await awaitable
        except (RedisError, OSError) as e:
            self.counters["redis_errors"] += 1
            self._lost(e)
            raise ClusterError(f"Redis at {redacted(self.url)}: {e}") from None

    def _lost(self, error) -> None:
        if self.healthy:
            self.healthy = False
            self._outbox.clear()
            log.warning("lost Redis at %s (%s): serving only the peers connected to this instance "
                        "until it is back", redacted(self.url), error or type(error).__name__)

    async def _keep(self) -> None:
        """Subscribe, (re)claim this instance's peers, heartbeat; start again when Redis fails."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    await self.redis.set(self.channel, os.getpid(), px=INSTANCE_TTL_MS)
                    was_lost = self._subscribed.is_set() and not self.healthy
                    self.healthy = True
                    peers = self.server.local_peers()
                    await self._claim(peers)
                    if was_lost:
                        log.warning("Redis at %s answers again: %d peers connected here registered again",
                                    redacted(self.url), len(peers))
                    self._subscribed.set()
                    await _first_to_fail(self._listen(pubsub), self._heartbeat())
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ClusterError) as e:
                self._lost(e)
            except Exception:  # keep the instance's Redis side alive whatever happens
                log.exception("Redis keeper failed")
                self._lost(None)
            await asyncio.sleep(RECONNECT_MAX_S)

    async def _listen(self, pubsub) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                self._on_message(message["data"])

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._guarded(self.redis.set(self.channel, os.getpid(), px=INSTANCE_TTL_MS))
            if loop.time() - refreshed >= PEER_REFRESH_S:
                refreshed = loop.time()
                await self._refresh(self.server.local_peers())

    async def _refresh(self, peer_ids) -> None:
        for start in range(0, len(peer_ids), CLAIM_BATCH):
            pipe = self.redis.pipeline(transaction=False)
            for peer_id in peer_ids[start:start + CLAIM_BATCH]:
                pipe.expire(peer_key(peer_id), PEER_TTL_S)
            await self._guarded(pipe.execute())


async def _first_to_fail(*coros) -> None:
    """Run coroutines together until one ends; cancel the others; raise what it raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
