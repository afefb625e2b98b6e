"""Live rows: peer.share_live on one database, peer.accept_live on the friend.

Real clusters, a real signaling server and real aiortc on loopback.  The module shares two
clusters, alice and bob, friends of each other; each test uses a table of its own.
"""

import random
import statistics
import time

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}
FRIEND_ROLE = "aq_live"


@pytest.fixture(scope="module")
def pair(module_testbed, module_signal_server):
    alice, bob = module_testbed.alice, module_testbed.bob
    tb.connected_friends(alice, bob, module_signal_server.url, FRIEND_ROLE)
    return alice, bob


@pytest.fixture
def peers(pair):
    alice, bob = pair
    tb.wait_connected(alice, "bob")
    tb.wait_connected(bob, "alice")
    return pair


def make_table(clusters, name, rows_sql=None):
    for cluster in clusters:
        cluster.sql(f"create table {name} (id int primary key, n int, title text, body text)")
        cluster.sql(f"grant select, insert, update, delete on {name} to {FRIEND_ROLE}")
        if rows_sql:
            cluster.sql(rows_sql)


def go_live(alice, bob, table, key='["1"]', ttl="10 min"):
    share = alice.scalar("select peer.share_live(%s::regclass, %s::jsonb, 'bob', %s::interval)", table, key, ttl)
    tb.wait_for(lambda: bob.scalar("select count(*) from peer.live_requests where id = %s", share) == 1, 30,
                message="the request to arrive")
    bob.sql("select peer.accept_live(%s)", share)
    tb.wait_for(lambda: alice.scalar("select state from peer.live_shares where id = %s", share) == "live", 30,
                message="alice to see the share live")
    return share


def row(cluster, table, key=1):
    return cluster.sql(f"select n, title, body from {table} where id = %s", key)[0]


def wait_row(clusters, table, expected, timeout=30, interval=0.01):
    tb.wait_for(lambda: all(row(c, table) == expected for c in clusters), timeout, interval=interval,
                message=f"{table} to be {expected!r} on both sides", ignore=(psycopg.Error,))


# --------------------------------------------------------------------------

def test_bad_requests_get_errors_that_say_what_to_do(peers):
    alice, _ = peers
    make_table((alice,), "public.bad", "insert into public.bad values (1, 0, 't', 'b')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"as bundle.status shows it.*\(id\)"):
        alice.sql("select peer.share_live('public.bad', '[1]', 'bob')")
    with pytest.raises(psycopg.errors.NoDataFound, match="no row of public.bad has the key"):
        alice.sql("""select peer.share_live('public.bad', '["2"]', 'bob')""")
    with pytest.raises(psycopg.errors.UndefinedObject, match='unknown friend "nobody"'):
        alice.sql("""select peer.share_live('public.bad', '["1"]', 'nobody')""")
    alice.sql("select peer.publish('public.bad', 'bob')")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match='already published to "bob"'):
        alice.sql("""select peer.share_live('public.bad', '["1"]', 'bob')""")


def test_100_alternating_updates_converge_each_within_moments(peers):
    alice, bob = peers
    make_table((alice, bob), "public.doc", "insert into public.doc values (1, 0, 'title', 'body'), (2, 0, 'x', 'y')")
    share = go_live(alice, bob, "public.doc")
    sides = [(alice, bob), (bob, alice)]
    latencies = []
    for i in range(100):
        writer, reader = sides[i % 2]
        value = f"value {i} by {'alice' if writer is alice else 'bob'}"
        writer.sql("update public.doc set n = %s, body = %s where id = 1", i, value)
        committed = time.monotonic()
        tb.wait_for(lambda reader=reader, i=i, value=value: row(reader, "public.doc")[::2] == (i, value), 30,
                    interval=0.002, message=f"update {i} to arrive")
        latencies.append(time.monotonic() - committed)
    wait_row((alice, bob), "public.doc", (99, "title", "value 99 by bob"))
    # only the live row is shared
    assert alice.sql("select n, body from public.doc where id = 2") == [(0, "y")]
    print(f"commit -> applied on the friend: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
    assert statistics.median(latencies) < 0.1
    for cluster in (alice, bob):
        assert cluster.sql("select state, ended_reason from peer.live_shares where id = %s", share) == [("live", None)]
        assert cluster.scalar("select count(*) from peer.subscriptions where relation = 'public.doc'::regclass "
                              "and state = 'streaming'") == 1


def test_concurrent_edits_at_the_start_and_the_end_of_10_kb_both_survive(peers):
    alice, bob = peers
    rng = random.Random(3)
    value = "".join(rng.choice("abcdefghij éü😀\n") for _ in range(10_000))
    make_table((alice, bob), "public.essay")
    for cluster in (alice, bob):
        cluster.sql("insert into public.essay values (1, 0, 'essay', %s)", value)
    go_live(alice, bob, "public.essay")
    # neither has seen the other's edit when it commits: alice's waits, uncommitted, while bob's
    # commits and reaches her
    with alice.connect(autocommit=False) as conn:
        conn.execute("update public.essay set body = 'Début — ' || body where id = 1")
        bob.sql("update public.essay set body = body || ' — fin 😀' where id = 1")
        time.sleep(0.5)
        conn.commit()
    wait_row((alice, bob), "public.essay", (0, "essay", "Début — " + value + " — fin 😀"))


def test_edits_made_before_going_live_merge_when_it_does(peers):
    alice, bob = peers
    make_table((alice, bob), "public.note")
    alice.sql("insert into public.note values (1, 1, 'alice title', 'the shared text')")
    bob.sql("insert into public.note values (1, 2, 'bob title', 'the shared text')")
    share = alice.scalar("""select peer.share_live('public.note', '["1"]', 'bob')""")
    tb.wait_for(lambda: bob.scalar("select count(*) from peer.live_requests") >= 1, 30)
    alice.sql("update public.note set body = 'alice: ' || body")   # after the request, before the accept
    bob.sql("update public.note set body = body || ' (bob)'")
    bob.sql("select peer.accept_live(%s)", share)
    # the requester's other columns are taken; text columns merge by characters, bob's title
    # change from the requested one as much as the bodies' edits
    wait_row((alice, bob), "public.note", (1, "bob title", "alice: the shared text (bob)"))


def test_ending_removes_what_the_share_set_up_and_tells_the_friend(peers):
    alice, bob = peers
    make_table((alice, bob), "public.card", "insert into public.card values (1, 0, 't', 'b')")
    bob.sql("select peer.subscribe('public.card', 'alice', initial => false)")  # bob's own, kept
    share = go_live(alice, bob, "public.card")
    # the text columns travel as documents only
    assert alice.sql("select array(select unnest(columns) order by 1) from peer.publications "
                     "where relation = 'public.card'::regclass") == [(["id", "n"],)]
    alice.sql("select peer.end_live(%s)", share)
    tb.wait_for(lambda: bob.scalar("select state from peer.live_shares where id = %s", share) == "ended", 30)
    assert bob.scalar("select ended_reason from peer.live_shares where id = %s",
                      share) == 'ended by "alice": ended here'
    for cluster in (alice, bob):
        assert cluster.scalar("select count(*) from peer.publication where relation = 'public.card'::regclass") == 0
        assert cluster.scalar("select count(*) from pg_trigger where tgrelid = 'public.card'::regclass") == 0
    assert alice.scalar("select count(*) from peer.subscription where relation = 'public.card'::regclass") == 0
    assert bob.scalar("select count(*) from peer.subscription where relation = 'public.card'::regclass") == 1
    # not live any more: an edit stays here
    alice.sql("update public.card set body = 'alone'")
    time.sleep(1)
    assert row(bob, "public.card") == (0, "t", "b")


def test_a_share_ends_after_its_ttl_without_an_edit(peers):
    alice, bob = peers
    make_table((alice, bob), "public.memo", "insert into public.memo values (1, 0, 't', 'b')")
    share = go_live(alice, bob, "public.memo", ttl="3 s")
    alice.sql("update public.memo set n = 1")  # an edit restarts the ttl
    started = time.monotonic()
    for cluster in (alice, bob):
        tb.wait_for(lambda cluster=cluster: cluster.scalar(
            "select state from peer.live_shares where id = %s", share) == "ended", 30,
            message="the share to end")
    assert time.monotonic() - started > 2
    # whichever side's clock ran out first ended it and told the other
    for cluster in (alice, bob):
        assert cluster.scalar("select ended_reason from peer.live_shares where id = %s",
                              share).endswith("no edit within its ttl")


def test_a_share_ends_when_the_friend_is_away_longer_than_the_soft_lock_ttl(peers):
    alice, bob = peers
    make_table((alice, bob), "public.away", "insert into public.away values (1, 0, 't', 'b')")
    share = go_live(alice, bob, "public.away")
    alice.sql("update peer.config set soft_lock_ttl = '2 s'")
    for cluster in (alice, bob):
        cluster.sql("update peer.friend set auto_connect = false")
    try:
        alice.sql("select peer.disconnect('bob')")
        alice.sql("update public.away set body = 'written while away'")  # never fails for the network
        tb.wait_for(lambda: alice.scalar("select state from peer.live_shares where id = %s", share) == "ended", 30,
                    message="alice to end the share")
        assert alice.scalar("select ended_reason from peer.live_shares where id = %s", share) == (
            "the friend was away longer than peer.config.soft_lock_ttl")
    finally:
        alice.sql("update peer.config set soft_lock_ttl = default")
        for cluster in (alice, bob):
            cluster.sql("update peer.friend set auto_connect = true")
        assert alice.scalar("select peer.connect('bob')") == "connected"
    # the friend is told when they meet again
    tb.wait_for(lambda: bob.scalar("select state from peer.live_shares where id = %s", share) == "ended", 30,
                message="bob to learn the share ended")
