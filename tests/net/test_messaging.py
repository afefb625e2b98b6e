"""Durable messages between databases: peer.send, the outbox and the inbox, topics, handlers.

Real clusters, a real signaling server and real aiortc on loopback.  Most
tests share one pair of befriended, connected clusters (alice sends, bob
receives) for the whole module and keep to topics of their own; the crash
tests make a pair of their own, since they kill servers.
"""

import asyncio
import json
import os
import random
import re
import threading
import time
import uuid
from pathlib import Path

import msgpack
import psycopg
import pytest

import aquapeer
import testbed as tb
from aquapeer import identity
from aquapeer.net import transport
from aquapeer.net.node import MemoryFriendBook, PeerNode

transport.configure_ice(["127.0.0.1"])  # the light peer of the misbehaving-peer test



# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def make_friends(a, a_name, b, b_name, signal_url):
    """Both join the signaling server, befriend each other (a knows b as b_name,
    b knows a as a_name) and connect."""
    tb.join_signaling(a, signal_url)
    tb.join_signaling(b, signal_url)
    tb.befriend(a, a_name, b, b_name)
    assert a.scalar("select peer.connect(%s)", b_name) == "connected"
    tb.wait_connected(b, a_name)


def allow(cluster, topic, friend):
    cluster.sql("select peer.allow_topic(%s, %s)", topic, friend)


def send(cluster, friend, topic, payload):
    """peer.send in a transaction of its own; the message id."""
    return cluster.scalar("select peer.send(%s, %s, %s::jsonb)", friend, topic, json.dumps(payload))


def send_batch(cluster, friend, topic, first, last):
    """One transaction sending {"n": first} .. {"n": last}, in that order."""
    cluster.sql("select peer.send(%s, %s, jsonb_build_object('n', g)) from generate_series(%s::int, %s::int) g",
                friend, topic, first, last)


def inbox_count(cluster, topic):
    return cluster.scalar("select count(*) from peer.inbox where topic = %s", topic)


def wait_inbox(cluster, topic, count, timeout=60):
    """Wait until the inbox holds at least count messages on topic."""
    tb.wait_for(lambda: inbox_count(cluster, topic) >= count, timeout, interval=0.1,
                message=f"{count} messages on {topic!r} in {cluster.name}'s inbox",
                ignore=(psycopg.OperationalError,))


def arrived(cluster, topic):
    """The payloads on topic in the inbox, in arrival order."""
    return [p for (p,) in cluster.sql("select payload from peer.inbox where topic = %s order by position", topic)]


def arrived_n(cluster, topic):
    return [n for (n,) in cluster.sql(
        "select (payload->>'n')::int from peer.inbox where topic = %s order by position", topic)]


def outbox_states(cluster, topic):
    return [s for (s,) in cluster.sql("select state from peer.outbox where topic = %s", topic)]


def wait_all_acked(cluster, topic, count, timeout=60):
    def done():
        rows = cluster.sql("select state, count(*) from peer.outbox where topic = %s group by state", topic)
        return dict(rows) == {"acked": count}
    try:
        tb.wait_for(done, timeout, interval=0.2, ignore=(psycopg.OperationalError,))
    except TimeoutError:
        rows = cluster.sql("select state, count(*) from peer.outbox where topic = %s group by state", topic)
        raise AssertionError(f"{cluster.name}'s outbox on {topic!r} is not all acked: {dict(rows)}") from None


def worker_pid(cluster):
    pids = cluster.backend_pids("aquapeer worker")
    assert len(pids) == 1, f"{cluster.name} has workers {pids}"
    return pids[0]


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"], "extra_conf": {"synchronous_commit": "on"}}


@pytest.fixture(scope="module")
def signal_server(module_signal_server):
    return module_signal_server


@pytest.fixture(scope="module")
def pair(module_testbed, signal_server):
    """alice and bob, befriended and connected, for the whole module.  Commits
    are synchronous so that a stopped server loses nothing it acknowledged."""
    alice, bob = module_testbed.alice, module_testbed.bob
    make_friends(alice, "alice", bob, "bob", signal_server.url)
    return alice, bob


@pytest.fixture
def messaging_pair(pair):
    """The shared pair, connected again if an earlier test left it otherwise."""
    alice, bob = pair
    for cluster in (alice, bob):
        if not cluster.is_running():
            cluster.start()
    tb.wait_connected(alice, "bob")
    tb.wait_connected(bob, "alice")
    return alice, bob


# --------------------------------------------------------------------------
# one message
# --------------------------------------------------------------------------

def test_a_message_arrives_once_with_its_columns_and_a_notification(messaging_pair):
    alice, bob = messaging_pair
    allow(bob, "greeting", "alice")
    payload = {"hello": "world", "list": [1, 2.5, None, True], "nested": {"é": "ünïcode"}}
    with bob.connect() as listener:
        listener.execute("listen aquapeer_inbox")
        message_id = send(alice, "bob", "greeting", payload)
        notified = None
        for notify in listener.notifies(timeout=30):
            if notify.channel == "aquapeer_inbox" and notify.payload == str(message_id):
                notified = notify
                break
        assert notified is not None, "no NOTIFY aquapeer_inbox with the message id within 30 s"
        # The notification comes after the commit: the row is already there.
        rows = listener.execute(
            "select id, friend, topic, payload, sent_at, received_at, position, handler, handled_at, "
            "handler_error, handler_attempts from peer.inbox where topic = 'greeting'").fetchall()
    assert len(rows) == 1
    (id_, friend, topic, got, sent_at, received_at, position, handler, handled_at,
     handler_error, handler_attempts) = rows[0]
    assert (id_, friend, topic, got) == (message_id, "alice", "greeting", payload)
    assert position is not None
    assert (handler, handled_at, handler_error, handler_attempts) == (None, None, None, 0)
    created_at, size = alice.sql("select created_at, bytes from peer.outbox where id = %s", message_id)[0]
    # One machine, one clock: made, then sent, then received (msgpack may round to the microsecond).
    slack = 0.005
    assert (sent_at - created_at).total_seconds() > -slack
    assert (received_at - sent_at).total_seconds() > -slack
    assert size == alice.scalar("select octet_length(%s::jsonb::text)", json.dumps(payload))
    wait_all_acked(alice, "greeting", 1, timeout=20)
    assert alice.sql("select friend, topic, payload, seq is not null, reason from peer.outbox where id = %s",
                     message_id) == [("bob", "greeting", payload, True, None)]
    time.sleep(1.0)
    assert inbox_count(bob, "greeting") == 1
    # the new columns of peer.connections, on a link that saw nothing wrong
    protocol, refused, last_refusal = alice.sql(
        "select protocol, frames_refused, last_refusal from peer.connections where friend = 'bob'")[0]
    assert protocol is not None and protocol >= 1
    assert (refused, last_refusal) == (0, None)


def test_a_large_message_arrives_whole(messaging_pair):
    """Larger than one data-channel message (aiortc: 256 KiB), smaller than max_message_bytes."""
    alice, bob = messaging_pair
    allow(bob, "large", "alice")
    rng = random.Random(4)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(2_000_000))
    first = send(alice, "bob", "large", {"n": 1, "text": text})
    send(alice, "bob", "large", {"n": 2})
    wait_inbox(bob, "large", 2, timeout=60)
    rows = bob.sql("select id, payload->>'n', md5(payload->>'text'), length(payload->>'text') "
                   "from peer.inbox where topic = 'large' order by position")
    assert [(r[0], r[1]) for r in rows][:1] == [(first, "1")]
    assert [r[1] for r in rows] == ["1", "2"]
    assert rows[0][2:] == (alice.scalar("select md5(%s)", text), 2_000_000)


# --------------------------------------------------------------------------
# order, transactions, topics
# --------------------------------------------------------------------------

def test_concurrent_senders_arrive_whole_and_after_what_committed_before_they_began(messaging_pair):
    """Two senders overlap in each round: each one's messages arrive together and in order (which
    of the two goes first is not promised: not commit order), and every round arrives after the
    rounds that committed before it began."""
    alice, bob = messaging_pair
    allow(bob, "commit-order", "alice")
    rounds = []

    def send_in(conn, tag):
        conn.execute("select peer.send('bob', 'commit-order', %s::jsonb)", [json.dumps({"tag": tag})])

    # a lock timeout, so that a sender waiting for the other fails instead of hanging the test
    # (statement_timeout does not cover the deferred triggers COMMIT runs)
    options = "-c lock_timeout=10s"
    with alice.connect(autocommit=False, options=options) as first, \
            alice.connect(autocommit=False, options=options) as second:
        for rnd, pause in enumerate([0.0, 0.5, 0.0, 0.0, 0.0, 0.0]):
            # first begins (and takes its outbox positions) before second, but commits after it
            send_in(first, f"{rnd}-first-a")
            send_in(second, f"{rnd}-second-a")
            send_in(first, f"{rnd}-first-b")
            send_in(second, f"{rnd}-second-b")
            second.commit()
            time.sleep(pause)
            first.commit()
            rounds.append(([f"{rnd}-first-a", f"{rnd}-first-b"], [f"{rnd}-second-a", f"{rnd}-second-b"]))
    expected = sum((a + b for a, b in rounds), [])
    wait_inbox(bob, "commit-order", len(expected), timeout=30)
    got = [p["tag"] for p in arrived(bob, "commit-order")]
    assert sorted(got) == sorted(expected)
    for rnd, (firsts, seconds) in enumerate(rounds):
        this_round = got[4 * rnd:4 * rnd + 4]
        assert this_round in (firsts + seconds, seconds + firsts), got


def test_a_rejected_topic_does_not_block_the_next_message(messaging_pair):
    alice, bob = messaging_pair
    allow(bob, "allowed-topic", "alice")
    refused = send(alice, "bob", "never-allowed", {"n": 1})
    after = send(alice, "bob", "allowed-topic", {"n": 2})
    wait_inbox(bob, "allowed-topic", 1, timeout=30)
    assert bob.scalar("select id from peer.inbox where topic = 'allowed-topic'") == after
    tb.wait_for(lambda: alice.scalar("select state from peer.outbox where id = %s", refused) == "rejected", 20,
                message="the message on a topic bob never allowed to show as rejected")
    reason = alice.scalar("select reason from peer.outbox where id = %s", refused)
    assert reason, "a rejected message says why"
    assert alice.scalar("select state from peer.outbox where id = %s", after) in ("sent", "acked")
    assert inbox_count(bob, "never-allowed") == 0

    # allowed for every friend (friend null), then taken back
    bob.sql("select peer.allow_topic('open-topic')")
    send(alice, "bob", "open-topic", {"n": 3})
    wait_inbox(bob, "open-topic", 1, timeout=30)
    assert bob.scalar("select peer.disallow_topic('open-topic')") is True
    refused_later = send(alice, "bob", "open-topic", {"n": 4})
    send(alice, "bob", "allowed-topic", {"n": 5})
    wait_inbox(bob, "allowed-topic", 2, timeout=30)
    tb.wait_for(lambda: alice.scalar("select state from peer.outbox where id = %s", refused_later) == "rejected",
                20, message="the message on a disallowed topic to show as rejected")
    assert arrived_n(bob, "open-topic") == [3]
    assert arrived_n(bob, "allowed-topic") == [2, 5]
    # allowing a topic to one friend is not allowing it to every friend
    assert bob.scalar("select peer.disallow_topic('allowed-topic')") is False


def test_a_rolled_back_send_never_arrives(messaging_pair):
    alice, bob = messaging_pair
    allow(bob, "rollback", "alice")
    with alice.connect(autocommit=False) as conn:
        rolled_back = conn.execute("select peer.send('bob', 'rollback', '{\"n\": 1}')").fetchone()[0]
        conn.rollback()
        conn.execute("select peer.send('bob', 'rollback', '{\"n\": 2}')")
        conn.execute("savepoint s")
        conn.execute("select peer.send('bob', 'rollback', '{\"n\": 3}')")
        conn.execute("rollback to savepoint s")
        conn.execute("select peer.send('bob', 'rollback', '{\"n\": 4}')")
        conn.commit()
    marker = send(alice, "bob", "rollback", {"n": 5})
    wait_inbox(bob, "rollback", 3, timeout=30)
    wait_all_acked(alice, "rollback", 3, timeout=20)
    time.sleep(1.0)
    assert arrived_n(bob, "rollback") == [2, 4, 5]
    assert bob.scalar("select id from peer.inbox where topic = 'rollback' order by position desc limit 1") == marker
    assert alice.scalar("select count(*) from peer.outbox where id = %s", rolled_back) == 0


def test_remove_friend_expires_its_queued_messages(messaging_pair, signal_server):
    alice, _ = messaging_pair
    ghost = identity.Identity.generate()  # a friend that never comes online
    alice.sql("select peer.add_friend('ghost', %s)",
              identity.make_invite(ghost, [signal_server.url], name_hint="ghost"))
    ids = [send(alice, "ghost", "to-ghost", {"n": n}) for n in (1, 2, 3)]
    time.sleep(1.0)
    assert outbox_states(alice, "to-ghost") == ["queued"] * 3
    assert alice.scalar("select peer.remove_friend('ghost', 'gone for good')") is True
    rows = alice.sql("select id, state, reason from peer.outbox where topic = 'to-ghost'")
    assert sorted(rows) == sorted((i, "expired", "gone for good") for i in ids)
    with pytest.raises(psycopg.errors.UndefinedObject, match='unknown friend "ghost"'):
        send(alice, "ghost", "to-ghost", {"n": 4})


# --------------------------------------------------------------------------
# handlers
# --------------------------------------------------------------------------

HANDLER_SETUP = """
    create role aq_msg_handler login;
    create table public.handled (seq bigint generated always as identity, id uuid, who text, session_who text, n int);
    create table public.handler_fixed (fixed boolean);
    grant insert on public.handled to aq_msg_handler;
    grant select on public.handler_fixed to aq_msg_handler;
    create function public.record_message(m peer.inbox) returns void language plpgsql as $$
    begin
        if (m.payload->>'n')::int < 0 and not exists (select from public.handler_fixed) then
            raise exception 'negative n: %', m.payload->>'n' using errcode = '22003';
        end if;
        insert into public.handled (id, who, session_who, n)
            values (m.id, current_user, session_user, (m.payload->>'n')::int);
    end $$;
"""

HANDLER_TEARDOWN = """
    select peer.on_message('handled', null);
    update peer.friend set role = 'aquapeer_friend' where name = 'alice';
    drop function public.record_message(peer.inbox);
    drop table public.handled, public.handler_fixed;
"""


def test_handlers_run_as_the_friend_role_and_a_raising_one_keeps_its_message(messaging_pair):
    alice, bob = messaging_pair
    bob.sql(HANDLER_SETUP)
    try:
        bob.sql("select peer.set_friend_role('alice', 'aq_msg_handler')")
        bob.sql("select peer.on_message('handled', 'public.record_message(peer.inbox)')")
        allow(bob, "handled", "alice")
        send_batch(alice, "bob", "handled", 1, 5)
        failing = send(alice, "bob", "handled", {"n": -1})
        tb.wait_for(lambda: bob.scalar("select count(*) from peer.inbox where topic = 'handled' "
                                       "and (handled_at is not null or handler_error is not null)") == 6,
                    30, message="bob's handler to run on all six messages")
        time.sleep(1.0)  # nothing runs twice
        # once each, in order, connected as alice's role
        assert bob.sql("select n, who, session_who from public.handled order by seq") == [
            (n, "aq_msg_handler", "aq_msg_handler") for n in range(1, 6)]
        assert bob.sql("select count(*) from peer.inbox i join public.handled h using (id)") == [(5,)]
        assert bob.sql("select distinct handler = 'public.record_message(peer.inbox)'::regprocedure, "
                       "handler_error, handler_attempts, handled_at is not null "
                       "from peer.inbox where topic = 'handled' and id <> %s", failing) == [(True, None, 1, True)]
        # the raising handler kept its message, with the error
        handled_at, error, attempts = bob.sql(
            "select handled_at, handler_error, handler_attempts from peer.inbox where id = %s", failing)[0]
        assert handled_at is None
        assert error and "negative n: -1" in error
        assert attempts == 1
        # retrying before the fix raises the handler's error again
        with pytest.raises(psycopg.errors.NumericValueOutOfRange, match="negative n: -1"):
            bob.sql("select peer.retry_message(%s)", failing)
        assert bob.scalar("select handled_at from peer.inbox where id = %s", failing) is None
        # fixed: the retry runs it, synchronously, as the friend's role
        bob.sql("insert into public.handler_fixed values (true)")
        assert bob.scalar("select peer.retry_message(%s)", failing) is True
        assert bob.sql("select n, who from public.handled where id = %s", failing) == [(-1, "aq_msg_handler")]
        handled_at, error, attempts = bob.sql(
            "select handled_at, handler_error, handler_attempts from peer.inbox where id = %s", failing)[0]
        assert handled_at is not None and error is None and attempts >= 2
        assert bob.scalar("select count(*) from public.handled") == 6
    finally:
        bob.sql(HANDLER_TEARDOWN)
        bob.sql("drop role aq_msg_handler")


def test_a_handler_cut_off_by_the_servers_shutdown_runs_again_after_it(messaging_pair):
    alice, bob = messaging_pair
    bob.sql("create function public.slow_handler(m peer.inbox) returns void language sql as 'select pg_sleep(2)'")
    try:
        bob.sql("select peer.on_message('slow', 'public.slow_handler(peer.inbox)')")
        allow(bob, "slow", "alice")
        sent = send(alice, "bob", "slow", {"n": 1})
        tb.wait_for(lambda: bob.scalar("select count(*) from pg_stat_activity where wait_event = 'PgSleep'") == 1,
                    30, interval=0.05, message="bob's handler to be running")
        bob.stop()  # fast: the executor is terminated mid-handler
        bob.start()
        tb.wait_for(lambda: bob.scalar("select handled_at is not null or handler_error is not null "
                                       "from peer.inbox where id = %s", sent), 30, ignore=(psycopg.Error,),
                    message="the message to be handled after the restart")
        assert bob.sql("select handler_error from peer.inbox where id = %s", sent) == [(None,)]
    finally:
        bob.sql("select peer.on_message('slow', null)")
        bob.sql("drop function public.slow_handler(peer.inbox)")


def test_on_message_refuses_a_function_of_the_wrong_shape(messaging_pair):
    _, bob = messaging_pair
    with pytest.raises(psycopg.errors.InvalidFunctionDefinition, match="peer.inbox"):
        bob.sql("select peer.on_message('x', 'pg_catalog.lower(text)')")


# --------------------------------------------------------------------------
# limits
# --------------------------------------------------------------------------

def _reconnect(alice, bob):
    alice.sql("select peer.disconnect('bob')")
    assert alice.scalar("select peer.connect('bob')") == "connected"


def test_send_refuses_a_payload_larger_than_the_friend_accepts(messaging_pair):
    alice, bob = messaging_pair
    allow(bob, "sized", "alice")
    default = bob.scalar("select max_message_bytes from peer.config")
    try:
        bob.sql("update peer.config set max_message_bytes = 2048")
        _reconnect(alice, bob)
        tb.wait_for(lambda: alice.scalar("select max_message_bytes from peer.friend where name = 'bob'") == 2048,
                    20, interval=0.2, message="alice to learn bob's max_message_bytes at connect")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            send(alice, "bob", "sized", {"n": 1, "s": "x" * 3000})
        assert alice.scalar("select count(*) from peer.outbox where topic = 'sized'") == 0
        send(alice, "bob", "sized", {"n": 2, "s": "x" * 1500})
        wait_inbox(bob, "sized", 1, timeout=30)
        assert arrived_n(bob, "sized") == [2]
    finally:
        bob.sql("update peer.config set max_message_bytes = %s", default)
        _reconnect(alice, bob)
        tb.wait_for(lambda: alice.scalar("select max_message_bytes from peer.friend where name = 'bob'") == default,
                    20, interval=0.2, message="alice to learn bob's max_message_bytes again")


# --------------------------------------------------------------------------
# a friend that is down, and crashes
# --------------------------------------------------------------------------

def test_messages_sent_while_the_friend_is_down_arrive_once_in_order(messaging_pair):
    alice, bob = messaging_pair
    allow(bob, "while-down", "alice")
    bob.stop()
    try:
        tb.wait_for(lambda: tb.connection_state(alice, "bob") != "connected", 15,
                    message="alice to notice bob is down")
        ids = [send(alice, "bob", "while-down", {"n": n}) for n in range(1, 11)]
        ids += [i for (i,) in alice.sql("select peer.send('bob', 'while-down', jsonb_build_object('n', g)) "
                                        "from generate_series(11, 30) g")]
        time.sleep(1.0)
        assert outbox_states(alice, "while-down") == ["queued"] * 30
    finally:
        bob.start()
    # Nobody calls peer.connect: the friends find each other again (auto_connect).
    wait_inbox(bob, "while-down", 30, timeout=60)
    wait_all_acked(alice, "while-down", 30, timeout=30)
    time.sleep(1.0)
    assert bob.sql("select id, (payload->>'n')::int from peer.inbox where topic = 'while-down' "
                   "order by position") == list(zip(ids, range(1, 31), strict=True))


STREAM = 10_000
BATCH = 500


class StreamSender(threading.Thread):
    """Sends {"n": first} .. {"n": last} to bob, a transaction per (first, last) of
    transactions, and stops at the first error (its server crashed)."""

    def __init__(self, cluster, transactions):
        super().__init__(daemon=True)
        self.cluster, self.transactions = cluster, transactions
        self.error = None

    def run(self):
        try:
            for first, last in self.transactions:
                send_batch(self.cluster, "bob", "stream", first, last)
        except psycopg.Error as exc:
            self.error = exc


def batches(first, last):
    return [(n, min(n + BATCH - 1, last)) for n in range(first, last + 1, BATCH)]


@pytest.mark.parametrize("victim", ["receiver", "sender"])
@pytest.mark.testbed(n=2, names=["alice", "bob"], extra_conf={"synchronous_commit": "on"})
def test_a_crash_mid_stream_loses_and_repeats_nothing(testbed, signal_server, victim):
    """kill -9 of every process of one side's server while 10,000 messages flow."""
    alice, bob = testbed.alice, testbed.bob
    make_friends(alice, "alice", bob, "bob", signal_server.url)
    allow(bob, "stream", "alice")
    # A first transaction large enough that the crash finds messages committed and not yet
    # acknowledged (delivery keeps up with transactions of 500), then transactions of 500.
    first = STREAM // 2
    sender = StreamSender(alice, [(1, first)] + batches(first + 1, STREAM))
    sender.start()
    # crash in the middle of the stream: some have arrived, alice is still sending
    tb.wait_for(lambda: inbox_count(bob, "stream") >= 300, 60, interval=0.02,
                message="the stream to start arriving")
    crashed = bob if victim == "receiver" else alice
    crashed.kill9()
    at_crash = inbox_count(bob, "stream") if victim == "sender" else None
    if victim == "receiver":
        print("bob killed; alice's outbox:",
              dict(alice.sql("select state, count(*) from peer.outbox where topic = 'stream' group by state")))
    sender.join(120)
    assert not sender.is_alive()
    if victim == "receiver":
        assert sender.error is None, sender.error  # alice went on while bob was down
        bob.start()
    else:
        assert sender.error is not None, "alice finished sending before the crash; nothing was tested"
        alice.start()
        # What alice committed before the crash is there, whole transactions only; send the rest,
        # perhaps before alice's worker is even back.
        committed = alice.scalar("select count(*) from peer.outbox where topic = 'stream'")
        assert committed >= first and committed % BATCH == 0 and committed == alice.scalar(
            "select max((payload->>'n')::int) from peer.outbox where topic = 'stream'")
        print(f"alice killed with {at_crash} messages in bob's inbox and {committed} committed")
        assert at_crash < committed, "everything alice committed had arrived before the crash"
        StreamSender(alice, batches(committed + 1, STREAM)).run()
    wait_inbox(bob, "stream", STREAM, timeout=150)
    wait_all_acked(alice, "stream", STREAM, timeout=60)
    time.sleep(1.0)
    assert inbox_count(bob, "stream") == STREAM
    ns = arrived_n(bob, "stream")
    assert len(set(ns)) == STREAM, "duplicates"
    assert ns == list(range(1, STREAM + 1)), "out of order"
    assert bob.scalar("select count(distinct id) from peer.inbox where topic = 'stream'") == STREAM


# --------------------------------------------------------------------------
# a misbehaving friend
# --------------------------------------------------------------------------

class LightPeer:
    """A PeerNode outside PostgreSQL, on an asyncio loop in a thread of the test process.
    Frames the node does not handle itself (msgs, ack, result, ...) are kept in .frames."""

    def __init__(self, signal_url, name):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"lightpeer-{name}", daemon=True)
        self.thread.start()
        self.me = identity.Identity.generate()
        self.book = MemoryFriendBook()
        self.invite = identity.make_invite(self.me, [signal_url], name_hint=name)
        self.frames = []
        self.node = None
        self.node = self.run(self._start(signal_url, name))

    async def _start(self, signal_url, name):
        node = PeerNode(self.me, self.book, signal_url, transport.IceServers(), name=name,
                        on_frame=lambda link, frame: self.frames.append(frame))
        await node.start()
        return node

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def befriend(self, name, invite):
        chain = identity.parse_invite(invite).chain

        async def add():
            self.book.add(name, chain, auto_connect=False)
        self.run(add())
        return chain.peer_id

    async def link(self, peer_id):
        """The connected link to peer_id, connecting again if need be."""
        link = self.node.links.get(peer_id)
        if link is None or link.state != "connected" or link.channel is None \
                or link.channel.readyState != "open":
            link = await self.node.connect(peer_id, timeout=30)
        return link

    def close(self):
        try:
            if self.node is not None:
                self.run(self.node.stop(), timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def mallory(messaging_pair, signal_server):
    """A light peer alice has as the friend 'mallory', connected; (light peer, alice's peer id)."""
    alice, _ = messaging_pair
    peer = LightPeer(signal_server.url, "mallory")
    try:
        alice_id = peer.befriend("alice", alice.scalar("select peer.invite()"))
        alice.sql("select peer.add_friend('mallory', %s)", peer.invite)
        link = peer.run(peer.node.connect(alice_id, timeout=20))
        assert link.state == "connected"
        tb.wait_connected(alice, "mallory", timeout=20)
        yield peer, alice_id
    finally:
        peer.close()
        alice.sql("select peer.remove_friend('mallory')")


def known_frame_kinds():
    """Every frame type the package's sources name ({"t": "..."}), and a few guesses."""
    kinds = {"msg", "message", "msgs", "ack", "nack", "reject", "call", "result", "cancel", "error", "config",
             "frag", "hello", "verified", "ping", "pong"}
    for path in Path(aquapeer.__file__).parent.rglob("*.py"):
        kinds.update(re.findall(r"""["']t["']\s*:\s*["'](\w+)["']""", path.read_text()))
    kinds.discard("bye")  # a well-formed goodbye closes the link, as it should
    return sorted(kinds)


FIELD_NAMES = ["id", "seq", "epoch", "prev", "items", "topic", "payload", "more", "data", "upto", "rejected",
               "fn", "arg", "timeout_ms", "ok", "result", "error", "at", "proto", "sig", "max_message_bytes",
               "sent_at", "n", "total"]


def junk_value(rng):
    return rng.choice([None, -1, 0, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 1.5, float("nan"), float("inf"), True,
                       "", "x", "\x00", "é" * 50, b"\x00\xff", os.urandom(16), [], {}, [1, [2, [3]]],
                       {"a": {"b": None}}, rng.randbytes(rng.randint(1, 64)), "a" * rng.randint(100, 5000),
                       {"t": "msgs"}, [[1, os.urandom(16), "t", 1.0, "{}"]], str(rng.random())])


def garbage_frames(count, kinds, rng):
    """Random bytes, truncated msgpack, maps of unknown and of known types with junk
    fields, wrong types, absurd headers, stray fragments; then a few near the data
    channel's largest message, and a fragmented frame larger than any limit."""
    for i in range(count):
        r = i % 10
        if r == 0:
            yield rng.randbytes(rng.randint(1, 300))
        elif r == 1:
            frame = {"t": rng.choice(kinds), **{rng.choice(FIELD_NAMES): junk_value(rng) for _ in range(4)}}
            packed = msgpack.packb(frame, use_bin_type=True)
            yield packed[:rng.randint(1, max(1, len(packed) - 1))]
        elif r == 2:
            yield msgpack.packb({"t": f"no-such-frame-{rng.randint(0, 10 ** 6)}", "x": junk_value(rng)},
                                use_bin_type=True)
        elif r == 3:
            frame = {"t": rng.choice(kinds)}
            for _ in range(rng.randint(0, 6)):
                frame[rng.choice(FIELD_NAMES)] = junk_value(rng)
            yield msgpack.packb(frame, use_bin_type=True)
        elif r == 4:
            yield msgpack.packb(rng.choice([None, 1, -5, 3.25, "t", b"t", ["t", "msgs"], [{"t": "ping"}], True]),
                                use_bin_type=True)
        elif r == 5:
            yield msgpack.packb({"t": junk_value(rng), "payload": junk_value(rng)}, use_bin_type=True)
        elif r == 6:
            yield rng.choice([
                b"\xdb\xff\xff\xff\xff" + b"abc",            # str of 4 GiB, 3 bytes given
                b"\xdf\xff\xff\xff\xff",                       # map of 4 billion entries
                b"\xc6\x7f\xff\xff\xff" + b"\x00" * 10,        # bin of 2 GiB
                b"\x91" * 5000 + b"\xc0",                      # arrays nested 5000 deep
                b"\x81\xa1t" * 3000 + b"\xc0",                 # maps nested 3000 deep
                b"\xc1",                                       # never used
                b"\xd4\x05\x00",                               # an ext type
                msgpack.packb({"t": "ping", "at": 1.0}, use_bin_type=True) + b"trailing",
                msgpack.packb({1: 2, (1, 2): "x", "t": None}, use_bin_type=True),
            ])
        elif r == 7:
            # stray or bogus fragments: a piece never finished, a last piece of junk
            yield msgpack.packb({"t": "frag", "more": rng.choice([True, False]),
                                 "data": rng.randbytes(rng.randint(1, 2000))}, use_bin_type=True)
        elif r == 8:
            yield msgpack.packb({"t": rng.choice(kinds), "epoch": os.urandom(16), "prev": junk_value(rng),
                                 "items": [[rng.choice([0, -1, 1, 2 ** 63]), junk_value(rng), junk_value(rng),
                                            junk_value(rng), junk_value(rng)]],
                                 "upto": junk_value(rng), "rejected": [[junk_value(rng), junk_value(rng)]]},
                                use_bin_type=True)
        else:
            yield rng.choice([b"", "", "{}", "hello", "\x00", '{"t": "msgs"}', "t" * 1000])  # empty, text
    # near the largest message aiortc takes (256 KiB)
    yield rng.randbytes(250_000)
    yield msgpack.packb({"t": "no-such-frame", "blob": rng.randbytes(240_000)}, use_bin_type=True)
    for kind in kinds:
        yield msgpack.packb({"t": kind, "payload": "p" * 200_000, "seq": 1, "total": 2 ** 40}, use_bin_type=True)
    # a fragmented frame larger than the 16 MiB a database takes by default
    piece = rng.randbytes(60 * 1024)
    for _ in range(17 * 1024 // 60 + 2):
        yield msgpack.packb({"t": "frag", "more": True, "data": piece}, use_bin_type=True)
    yield msgpack.packb({"t": "frag", "more": False, "data": b"\x80"}, use_bin_type=True)


GARBAGE_PER_SECOND = 1500  # under the rate a friend may send at, so most frames reach the decoder


async def write_garbage(peer, peer_id, frames, max_reconnects=10):
    """Write frames straight onto the data channel, bypassing the link's own queues;
    connects again if the friend closes the link.  Returns (written, reconnects)."""
    link = await peer.link(peer_id)
    written = reconnects = 0
    started = time.monotonic()
    for data in frames:
        if link.state != "connected" or link.channel.readyState != "open":
            if reconnects >= max_reconnects:
                break
            reconnects += 1
            link = await peer.link(peer_id)
        link.channel.send(data)
        written += 1
        while link.channel.bufferedAmount > 1024 * 1024 and link.channel.readyState == "open":
            await asyncio.sleep(0.005)
        if written % 50 == 0:
            ahead = written / GARBAGE_PER_SECOND - (time.monotonic() - started)
            await asyncio.sleep(max(0.0, ahead))  # also lets pings and the link's writer run
    # until aiortc has handed everything to the network
    deadline = time.monotonic() + 30
    while link.channel.bufferedAmount > 0 and link.channel.readyState == "open" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return written, reconnects


def test_garbage_from_a_misbehaving_peer_leaves_the_worker_and_other_friends_alone(messaging_pair, mallory):
    alice, bob = messaging_pair
    peer, alice_id = mallory
    allow(bob, "bystander", "alice")
    allow(alice, "bystander-back", "bob")
    pid = worker_pid(alice)
    from_mallory = alice.scalar("select count(*) from peer.inbox where friend = 'mallory'")

    send_batch(alice, "bob", "bystander", 1, 300)  # in flight while the garbage lands
    rng = random.Random(1234)
    started = time.monotonic()
    written, reconnects = peer.run(
        write_garbage(peer, alice_id, garbage_frames(10_000, known_frame_kinds(), rng)), timeout=240)
    print(f"mallory wrote {written} garbage frames in {time.monotonic() - started:.1f} s "
          f"({reconnects} reconnects)")
    assert written >= 10_000

    send_batch(alice, "bob", "bystander", 301, 600)
    send(bob, "alice", "bystander-back", {"n": 1})
    wait_inbox(bob, "bystander", 600, timeout=60)
    wait_inbox(alice, "bystander-back", 1, timeout=30)
    assert arrived_n(bob, "bystander") == list(range(1, 601))
    assert worker_pid(alice) == pid, "alice's worker was restarted"
    assert tb.connection_state(alice, "bob") == "connected"
    refused, last_refusal = alice.sql(
        "select frames_refused, last_refusal from peer.connections where friend = 'mallory'")[0]
    print(f"alice refused {refused} frames from mallory; the last: {last_refusal}")
    assert refused > 0 and last_refusal
    assert alice.scalar("select count(*) from peer.inbox where friend = 'mallory'") == from_mallory
    assert alice.scalar("select peer.ping_worker() is not null") is True


async def flood(peer, peer_id, count):
    """count well-formed cancel frames, as fast as the channel takes them."""
    link = await peer.link(peer_id)
    for n in range(count):
        link.channel.send(msgpack.packb({"t": "cancel", "id": n.to_bytes(16, "big")}, use_bin_type=True))
        if n % 500 == 0:
            await asyncio.sleep(0)
    while link.channel.bufferedAmount > 0 and link.channel.readyState == "open":
        await asyncio.sleep(0.05)


def test_a_flood_beyond_the_rate_limit_is_refused_counted_and_logged(messaging_pair, mallory):
    alice, bob = messaging_pair
    peer, alice_id = mallory
    pid = worker_pid(alice)
    offset = alice.log_size()
    frames = 3 * transport.FRAME_BURST
    started = time.monotonic()
    peer.run(flood(peer, alice_id, frames), timeout=120)
    took = time.monotonic() - started
    # Only frames beyond the burst that come faster than FRAMES_PER_SECOND are refused: about this many
    # when alice reads them as fast as they are sent (some 5,000 on an idle 2-core machine).  With both
    # cores busy elsewhere the flood took up to 5 s, within the limit, and nothing was refused: a
    # machine that loaded cannot show the limit, and says so instead of failing.
    beyond_the_limit = frames - transport.FRAME_BURST - transport.FRAMES_PER_SECOND * took
    if beyond_the_limit < transport.FRAME_BURST // 2:
        pytest.skip(f"the flood took {took:.1f} s: too slow to exceed {transport.FRAMES_PER_SECOND} "
                    "frames a second for long (a loaded machine)")
    # The worker may still be draining the flood before it answers.
    tb.wait_for(lambda: alice.scalar("select frames_refused from peer.connections where friend = 'mallory'"),
                30, message="alice to count refused frames")
    refused, last_refusal = alice.sql(
        "select frames_refused, last_refusal from peer.connections where friend = 'mallory'")[0]
    # Alice may read a little slower than the light peer sends; half of the estimate leaves room for that.
    assert refused >= beyond_the_limit // 2, (refused, took)
    assert last_refusal == f"more than {transport.FRAMES_PER_SECOND} frames a second"
    alice.wait_for_log(r"refused a frame from mallory: more than \d+ frames a second", 10, since=offset)
    assert worker_pid(alice) == pid
    allow(bob, "after-flood", "alice")
    send(alice, "bob", "after-flood", {"n": 1})
    wait_inbox(bob, "after-flood", 1, timeout=30)


class HostileSender:
    """Well-formed frames with hostile contents, from the light peer, one step at a time."""

    def __init__(self, peer, peer_id):
        self.peer, self.peer_id = peer, peer_id
        self.epoch = os.urandom(16)
        self.seq = 0
        self.prev = {}  # link -> the last seq sent on it

    async def _wait(self, link, done, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = done()
            if found:
                return "answered", found
            if link.state != "connected":
                return "closed", link.last_error
            await asyncio.sleep(0.05)
        return "silent", None

    async def msgs(self, items, epoch=None, timeout=20):
        """items: (topic, sent_at, payload text, id or None); waits for the ack, or the link to close."""
        link = await self.peer.link(self.peer_id)
        rows = []
        for topic, sent_at, payload, mid in items:
            self.seq += 1
            rows.append([self.seq, mid or uuid.uuid4().bytes, topic, sent_at, payload])
        epoch = epoch or self.epoch
        link.send({"t": "msgs", "epoch": epoch, "prev": self.prev.get(link), "items": rows})
        self.prev[link] = rows[-1][0]
        upto = rows[-1][0]
        return await self._wait(link, lambda: next(
            (f for f in self.peer.frames if f.get("t") == "ack" and f.get("epoch") == epoch
             and f.get("upto", 0) >= upto), None), timeout)

    async def frame(self, frame, answered=lambda f: False, timeout=5):
        link = await self.peer.link(self.peer_id)
        link.send(frame)
        return await self._wait(link, lambda: next((f for f in self.peer.frames if answered(f)), None), timeout)


def test_hostile_but_well_formed_frames_from_a_friend(messaging_pair, mallory):
    """A friend speaking the protocol with poison inside: payloads PostgreSQL refuses,
    absurd timestamps, a NUL in a topic, a repeated id, forged acknowledgements, calls
    of things never exposed.  The worker survives, other friends are not disturbed,
    and the friend's next good message is stored."""
    alice, bob = messaging_pair
    peer, alice_id = mallory
    allow(alice, "from-mallory", "mallory")
    allow(bob, "bystander2", "alice")
    pid = worker_pid(alice)
    baseline = alice.scalar("select coalesce(max(position), 0) from peer.inbox")
    hostile = HostileSender(peer, alice_id)
    topic = "from-mallory"
    outcomes = {}

    def step(name, coro):
        outcomes[name] = peer.run(coro, timeout=90)[0]

    step("not json", hostile.msgs([(topic, time.time(), "{", None)]))
    step("NUL in json", hostile.msgs([(topic, time.time(), '"\\u0000"', None)]))
    step("deep json", hostile.msgs([(topic, time.time(), "[" * 100_000 + "]" * 100_000, None)]))
    # Frames the wire format refuses get no answer: a short wait is enough to see that.
    step("NaN sent_at", hostile.msgs([(topic, float("nan"), "{}", None)], timeout=3))
    step("huge sent_at", hostile.msgs([(topic, 1e300, "{}", None)], timeout=3))
    step("NUL in topic", hostile.msgs([("from-\x00mallory", time.time(), "{}", None)], timeout=3))
    step("not allowed", hostile.msgs([("not-for-mallory", time.time(), "{}", None)]))
    same_id = uuid.uuid4().bytes
    step("repeated id", hostile.msgs([(topic, time.time(), '{"copy": 1}', same_id),
                                      (topic, time.time(), '{"copy": 2}', same_id)]))
    send_batch(alice, "bob", "bystander2", 1, 100)  # alice <-> bob meanwhile
    # calls of things never exposed
    for fn in ("public.no_such_function", "pg_catalog.pg_terminate_backend", "a\x00b"):
        call_id = uuid.uuid4().bytes
        step(f"call {fn!r}", hostile.frame({"t": "call", "id": call_id, "fn": fn, "arg": "{", "timeout_ms": 5000},
                                           lambda f, i=call_id: f.get("t") == "result" and f.get("id") == i))
    # acknowledgements forged on alice's real stream to mallory
    alice.sql("select peer.send('mallory', 'to-mallory', '{}')")

    async def alices_epoch():
        return await hostile._wait(await peer.link(alice_id), lambda: next(
            (f["epoch"] for f in peer.frames if f.get("t") == "msgs"), None))
    answered, epoch = peer.run(alices_epoch(), timeout=30)
    assert answered == "answered", "alice's message to mallory never came"
    for name, ack in [("ack far ahead", {"upto": 2 ** 63 - 1, "rejected": [[2 ** 62, "x" * 1000]]}),
                      ("ack NUL reason", {"upto": 1, "rejected": [[1, "nul \x00 reason"]]})]:
        step(name, hostile.frame({"t": "ack", "epoch": epoch, **ack}, timeout=2))
    print("outcomes:", outcomes)

    # the friend's next good message is stored, once (sent again, same id, until acknowledged)
    good_id = uuid.uuid4().bytes
    for attempt in range(4):
        step(f"good {attempt}", hostile.msgs([(topic, time.time(), '{"good": true}', good_id)]))
        if outcomes[f"good {attempt}"] == "answered":
            break
    tb.wait_for(lambda: alice.scalar("select count(*) from peer.inbox where friend = 'mallory' "
                                     "and payload = '{\"good\": true}'") == 1, 30,
                message="mallory's good message after the poison")
    stored = alice.sql("select topic, payload from peer.inbox where friend = 'mallory' and position > %s "
                       "order by position", baseline)
    assert stored == [(topic, {"copy": 1}), (topic, {"good": True})]
    results = [f for f in peer.frames if f.get("t") == "result"]
    assert results and all(not f["ok"] for f in results)
    assert any((f["error"] or {}).get("sqlstate") == "42883" for f in results)

    wait_inbox(bob, "bystander2", 100, timeout=30)
    assert arrived_n(bob, "bystander2") == list(range(1, 101))
    assert worker_pid(alice) == pid, "alice's worker was restarted"
    assert alice.scalar("select peer.ping_worker() is not null") is True
