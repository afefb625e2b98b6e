"""Light peers: many PeerNodes in one asyncio process, outside PostgreSQL.

Tests and benchmarks use them to give a database many friends without many
databases.  Each light peer has its own Identity and a MemoryFriendBook, and
speaks the same protocol with the same identity checks as the worker's node
(it *is* a PeerNode).  The database under test is every light peer's only
friend, with auto_connect, so once the database adds a light peer's invite
as a friend they connect by themselves (and the database, whose friends
default to auto_connect too, may connect first).

Before the database knows them, their offers are refused (and recorded as
friend requests there); each light peer's supervisor then backs off, at most
10 s between attempts (node.RECONNECT_MAX_S).  With ``offer_after`` they
make no offers at first, so a database that adds them in time connects to
them itself and never hears from them as strangers.

Echo peers (:func:`run_echo_peers`, ``aquapeer lightpeers --echo``) are only
registrations at signaling servers that send every envelope back to its
sender: the far end of bench/signaling.py's round trips.
"""

import asyncio
import collections
import json
import logging
import os
import time
import uuid

from .. import identity
from . import transport, wire
from .node import MemoryFriendBook, PeerNode
from .signaling import SignalClient, SignalingError

log = logging.getLogger("aquapeer.lightpeer")

FRIEND_NAME = "database"
STATUS_INTERVAL_S = 10.0
REGISTERING_AT_ONCE = 100  # registrations in flight: under a signaling server's 256 pending connections


def _write_json_atomically(path, obj):
    """Write obj as JSON to path so that a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.write("\n")
    os.replace(tmp, path)


def link_states(nodes):
    """How many light peers' links to the database are in each state ("none": no link)."""
    states = collections.Counter()
    for node in nodes:
        link = next(iter(node.links.values()), None)
        states[link.state if link is not None else "none"] += 1
    return states


def describe(nodes):
    """One dict per light peer: its registration and its link to the database, down to aiortc's states."""
    out = []
    for node in nodes:
        link = next(iter(node.links.values()), None)
        closed = next(iter(node.last_closed.values()), None)
        row = {"name": node.name, "peer_id": node.me.peer_id, "signal": node.signal.state,
               "link": link.state if link else None,
               "last_error": (link or closed).last_error if (link or closed) else None}
        if link is not None:
            pc, channel = link.pc, link.channel
            row.update(offerer=link.offerer, session=link.session.hex()[:8],
                       signaling=pc.signalingState if pc else None,
                       ice=pc.iceConnectionState if pc else None,
                       connection=pc.connectionState if pc else None,
                       channel=channel.readyState if channel else None)
        out.append(row)
    return out


def send_locks(node, relation, keys, *, ttl_s=30.0, note=None):
    """Tell the database, as one sync, that this light peer holds soft locks on rows of relation
    (a table name; keys: each a list of the key columns' texts, or None for the whole table),
    in ``locks`` frames of at most wire.MAX_LOCK_ITEMS items; the locks' ids (16 bytes each).
    The sync replaces what the database had of this light peer's locks; they are held while
    the link lasts, then ttl_s.  Call it on the light peers' event loop."""
    link = next(iter(node.links.values()), None)
    if link is None or link.state != "connected" or link.protocol < wire.PRESENCE_PROTOCOL:
        raise RuntimeError(f"{node.name} has no connected link that speaks presence")
    keys = list(keys)
    ids = [uuid.uuid4().bytes for _ in keys]
    items = [[lock_id, relation, key, note, float(ttl_s), None] for lock_id, key in zip(ids, keys, strict=True)]
    batches = [items[i:i + wire.MAX_LOCK_ITEMS] for i in range(0, len(items), wire.MAX_LOCK_ITEMS)] or [[]]
    for n, batch in enumerate(batches):
        link.send({"t": "locks", "sync": n == 0, "done": n == len(batches) - 1, "set": batch, "drop": []},
                  transport.CONTROL)
    return ids


async def _report(nodes, interval):
    """Log the light peers' link states whenever they change."""
    last = None
    while True:
        await asyncio.sleep(interval)
        now = (sorted(link_states(nodes).items()), sum(1 for n in nodes if n.signal.connected))
        if now != last:
            log.info("links of %d light peers to the database: %s; %d registered at the signaling server",
                     len(nodes), ", ".join(f"{n} {state}" for state, n in now[0]), now[1])
            last = now


async def run_light_peers(count, signal_url, friend_invite: str, host_addresses=("127.0.0.1",),
                          ready_file=None, *, offer_after=0.0, started=None):
    """Run `count` light peers befriending the peer of `friend_invite` until cancelled.

    Once all are started (registration attempted; one that is not yet
    registered keeps trying in the background), their invites, in order
    light0, light1, ..., go to `ready_file` as a JSON list, and to the
    `started` callback if one is given.

    offer_after: seconds after that during which the light peers make no
    offers of their own (the database is not yet their auto_connect friend),
    so a database that adds them in that time connects to them first and is
    never sent an offer by a stranger; they still answer its offers.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    friend = identity.parse_invite(friend_invite)  # IdentityError on a bad or tampered invite
    identity.check_signal_url(signal_url)
    transport.configure_ice(host_addresses)
    nodes, invites = [], []
    for i in range(count):
        me = identity.Identity.generate()
        book = MemoryFriendBook()
        book.add(FRIEND_NAME, friend.chain, auto_connect=offer_after <= 0)
        nodes.append(PeerNode(me, book, signal_url, transport.IceServers(), name=f"light{i}"))
        invites.append(identity.make_invite(me, [signal_url], name_hint=f"light{i}"))
    reporter = None
    try:
        # SignalClient.start waits up to 5 s for registration, so start them together.
        await asyncio.gather(*(node.start() for node in nodes))
        registered = sum(1 for n in nodes if n.signal.connected)
        if registered < count:
            log.warning("%d of %d light peers registered at %s so far; the others keep trying",
                        registered, count, signal_url)
        else:
            log.info("%d light peers registered at %s as friends of %s", count, signal_url, friend.peer_id)
        if ready_file is not None:
            _write_json_atomically(ready_file, invites)
        if started is not None:
            started(nodes, invites)
        if offer_after > 0:
            def offer_from_now_on():
                for node in nodes:
                    node.friends.lookup(friend.peer_id).auto_connect = True
                log.info("light peers offer by themselves from now on")
            asyncio.get_running_loop().call_later(offer_after, offer_from_now_on)
        reporter = asyncio.ensure_future(_report(nodes, STATUS_INTERVAL_S))
        await asyncio.Event().wait()  # until cancelled
    finally:
        if reporter is not None:
            reporter.cancel()
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)
        log.info("light peers stopped")


async def register_signal_clients(identities, signal_urls, envelope_handler):
    """A started SignalClient per identity, round robin over signal_urls, with at most
    REGISTERING_AT_ONCE registering at a time; ``envelope_handler(i)`` makes the i-th
    one's on_envelope.  All are registered on return (else SignalingError)."""
    gate = asyncio.Semaphore(REGISTERING_AT_ONCE)
    clients = [SignalClient(signal_urls[i % len(signal_urls)], me, envelope_handler(i))
               for i, me in enumerate(identities)]

    async def register(client):
        async with gate:
            if not await client.start(timeout=60):
                raise SignalingError(f"could not register at {client.url}: {client.last_error}")

    results = await asyncio.gather(*(register(c) for c in clients), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        raise SignalingError(f"{len(failed)} of {len(clients)} light peers did not register; first: {failed[0]}")
    return clients


async def run_echo_peers(count, signal_urls, ready_file=None):
    """Register `count` echo peers round robin over signal_urls, each sending every
    envelope back to its sender, until cancelled.  Once all are registered, their peer
    ids (in order) and the seconds registering took go to `ready_file` as JSON."""
    if count < 1:
        raise ValueError("count must be at least 1")
    for url in signal_urls:
        identity.check_signal_url(url)
    clients = []

    def echo_by(i):
        async def echo(sender, env):  # a coroutine: the client runs it as a task it keeps
            try:
                await clients[i].send(sender, env)
            except SignalingError:
                pass  # not registered this moment: the sender counts it lost
        return echo

    started = time.monotonic()
    clients.extend(await register_signal_clients(
        [identity.Identity.generate() for _ in range(count)], signal_urls, echo_by))
    took = time.monotonic() - started
    log.info("%d echo peers registered at %s in %.1f s", count, ", ".join(signal_urls), took)
    try:
        if ready_file is not None:
            _write_json_atomically(ready_file, {"peer_ids": [c.peer_id for c in clients], "register_s": took})
        await asyncio.Event().wait()  # until cancelled
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        log.info("echo peers stopped")
