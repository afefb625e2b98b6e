"""Presence and soft locks between two real clusters over real aiortc links.

alice and bob are friends; each test uses tables of its own, published from
alice to bob (so each side tells the other of locks on them) unless it says
otherwise.  The test that kills alice's server with kill -9 runs last.
"""

import json
import re
import time

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}


@pytest.fixture(scope="module")
def pair(module_testbed, module_signal_server):
    alice, bob = module_testbed.alice, module_testbed.bob
    tb.connected_friends(alice, bob, module_signal_server.url)
    return alice, bob


@pytest.fixture
def peers(pair):
    alice, bob = pair
    tb.wait_connected(alice, "bob")
    tb.wait_connected(bob, "alice")
    return pair


def shared_table(alice, bob, name):
    """A table on both sides that alice publishes to bob and bob subscribes to."""
    for cluster in (alice, bob):
        cluster.sql(f"create table {name} (id int primary key, body text)")
        cluster.sql(f"insert into {name} select n, 'row ' || n from generate_series(1, 200) n")
        cluster.sql(f"grant select, insert, update, delete on {name} to aquapeer_friend")
    alice.sql("select peer.publish(%s, 'bob')", name)
    bob.sql("select peer.subscribe(%s, 'alice', initial => false)", name)


def locks(cluster, table):
    return cluster.sql("select key, holder, note, expires_at is null from peer.soft_locks "
                       "where relation = %s::regclass order by key, holder", table)


def wait_locks(cluster, table, expected, timeout=5.0):
    tb.wait_for(lambda: locks(cluster, table) == expected, timeout, interval=0.02,
                message=f"soft locks on {table} at {cluster.name} to be {expected}, "
                        f"not {locks(cluster, table)}")


class Listener:
    """A session LISTENing on aquapeer_soft_lock."""

    def __init__(self, cluster):
        self.conn = cluster.connect(autocommit=True)
        self.conn.execute("listen aquapeer_soft_lock")

    def wait(self, timeout=5.0, **match):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for note in self.conn.notifies(timeout=max(0.0, deadline - time.monotonic()), stop_after=1):
                payload = json.loads(note.payload)
                if all(payload.get(k) == v for k, v in match.items()):
                    return payload
        raise AssertionError(f"no aquapeer_soft_lock notification like {match} within {timeout} s")

    def quiet(self, seconds):
        """The notifications that came within seconds."""
        return [json.loads(n.payload) for n in self.conn.notifies(timeout=seconds)]

    def close(self):
        self.conn.close()


# --------------------------------------------------------------------------

def test_a_lock_is_seen_by_the_friend_within_a_second_with_its_note(peers):
    alice, bob = peers
    shared_table(alice, bob, "public.doc_a")
    started = time.monotonic()
    with alice.connect(autocommit=True) as session:
        lock_id = session.execute("select peer.soft_lock('public.doc_a', '[\"7\"]', note => 'fixing the typo')"
                                  ).fetchone()[0]
        wait_locks(bob, "public.doc_a", [(["7"], "alice", "fixing the typo", True)], timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert locks(alice, "public.doc_a") == [(["7"], "self", "fixing the typo", True)]
        assert bob.scalar("select id from peer.soft_locks where holder = 'alice'") == lock_id
        # Released by id: gone on both sides.
        assert session.execute("select peer.release_lock(%s)", (lock_id,)).fetchone()[0] is True
        assert session.execute("select peer.release_lock(%s)", (lock_id,)).fetchone()[0] is False
        wait_locks(bob, "public.doc_a", [])
    assert locks(alice, "public.doc_a") == []


def test_bad_keys_are_refused_with_the_fix(peers):
    alice, bob = peers
    alice.sql("create table public.doc_bad (a int, b int, body text, primary key (a, b))")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"does not name a row") as e:
        alice.sql("select peer.soft_lock('public.doc_bad', '[\"1\"]')")
    assert "a, b" in e.value.diag.message_detail
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"does not name a row"):
        alice.sql("select peer.soft_lock('public.doc_bad', '[1, 2]')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="ttl must be positive"):
        alice.sql("select peer.soft_lock('public.doc_bad', '[\"1\", \"2\"]', ttl => '-1 s')")
    alice.sql("create table public.doc_nokey (body text)")
    with pytest.raises(psycopg.errors.InvalidTableDefinition, match="no primary key"):
        alice.sql("select peer.soft_lock('public.doc_nokey', null)")
    assert alice.scalar("select count(*) from peer.soft_lock") == 0


def test_a_session_lock_goes_when_its_session_ends_and_a_rollback_does_not_hide_it(peers):
    alice, bob = peers
    shared_table(alice, bob, "public.doc_b")
    session = alice.connect()
    session.execute("select peer.soft_lock('public.doc_b', '[\"3\"]')")
    session.rollback()  # the lock was never the transaction's
    wait_locks(bob, "public.doc_b", [(["3"], "alice", None, True)])
    # A lock without a session lives until its TTL.
    session.execute("select peer.soft_lock('public.doc_b', '[\"4\"]', ttl => '3 s', session => false)")
    session.commit()
    wait_locks(bob, "public.doc_b", [(["3"], "alice", None, True), (["4"], "alice", None, False)])
    session.close()
    wait_locks(bob, "public.doc_b", [(["4"], "alice", None, False)], timeout=3.0)
    wait_locks(bob, "public.doc_b", [], timeout=5.0)
    wait_locks(alice, "public.doc_b", [], timeout=2.0)


def test_locks_never_block_writes(peers):
    alice, bob = peers
    shared_table(alice, bob, "public.doc_c")
    bob.sql("select peer.soft_lock('public.doc_c', '[\"5\"]', session => false)")
    wait_locks(alice, "public.doc_c", [(["5"], "bob", None, False)])
    alice.sql("update public.doc_c set body = 'written under bob''s lock' where id = 5")
    tb.wait_for(lambda: bob.scalar("select body from public.doc_c where id = 5") == "written under bob's lock",
                10, message="alice's write to reach bob")
    # A whole-table lock does not block either.
    bob.sql("select peer.soft_lock('public.doc_c', null, session => false)")
    wait_locks(alice, "public.doc_c", [(["5"], "bob", None, False), (None, "bob", None, False)])
    alice.sql("delete from public.doc_c where id = 6")


def test_both_sides_hear_of_an_overlap_and_of_its_release(peers):
    alice, bob = peers
    shared_table(alice, bob, "public.doc_d")
    on_alice, on_bob = Listener(alice), Listener(bob)
    try:
        alice_lock = alice.scalar("select peer.soft_lock('public.doc_d', '[\"9\"]', session => false)")
        wait_locks(bob, "public.doc_d", [(["9"], "alice", None, False)])
        assert on_bob.quiet(0.3) == []  # bob edits nothing there
        bob_lock = bob.scalar("select peer.soft_lock('public.doc_d', '[\"9\"]', session => false)")
        seen_by_bob = on_bob.wait(id=str(alice_lock), kind="overlap")
        assert seen_by_bob["holder"] == "alice" and seen_by_bob["key"] == ["9"]
        on_alice.wait(id=str(bob_lock), kind="overlap", holder="bob")
        # Another row: no overlap.
        bob.scalar("select peer.soft_lock('public.doc_d', '[\"10\"]', session => false)")
        wait_locks(alice, "public.doc_d", [(["10"], "bob", None, False), (["9"], "bob", None, False),
                                           (["9"], "self", None, False)])
        assert on_alice.quiet(0.3) == []
        bob.sql("select peer.release_lock(%s)", bob_lock)
        on_alice.wait(id=str(bob_lock), kind="released")
    finally:
        on_alice.close()
        on_bob.close()


def test_a_friends_lock_on_a_row_changed_since_the_last_commit_is_notified(peers):
    alice, bob = peers
    shared_table(alice, bob, "public.doc_e")
    bob.sql("select bundle.create('docs'); select bundle.track('docs', 'public.doc_e')")
    bob.sql("select bundle.commit('docs', 'first')")
    bob.sql("update public.doc_e set body = 'bob''s draft' where id = 2")
    on_bob = Listener(bob)
    try:
        alice.sql("select peer.soft_lock('public.doc_e', '[\"1\"]', session => false)")
        wait_locks(bob, "public.doc_e", [(["1"], "alice", None, False)])
        assert on_bob.quiet(0.3) == []  # row 1 is as committed
        lock_id = alice.scalar("select peer.soft_lock('public.doc_e', '[\"2\"]', session => false)")
        assert on_bob.wait(kind="overlap")["id"] == str(lock_id)
    finally:
        on_bob.close()
        bob.sql("select bundle.drop('docs')")


def test_auto_soft_lock_locks_each_row_once_and_a_big_statement_the_table(peers):
    alice, bob = peers
    shared_table(alice, bob, "public.doc_f")
    alice.sql("select peer.auto_soft_lock('public.doc_f')")
    alice.sql("update peer.config set max_auto_locks_per_statement = 100")
    with alice.connect(autocommit=True) as editor:
        editor.execute("update public.doc_f set body = body || '!' where id in (1, 2, 3)")
        wait_locks(bob, "public.doc_f", [(["1"], "alice", None, True), (["2"], "alice", None, True),
                                         (["3"], "alice", None, True)])
        mine = "select id from peer.soft_lock where relation = 'public.doc_f'::regclass and holder is null "
        ids = alice.sql(mine + "order by key")
        editor.execute("update public.doc_f set body = body || '?' where id in (2, 3)")
        editor.execute("update public.doc_f set body = body || '?' where id = 4")
        wait_locks(bob, "public.doc_f", [(["1"], "alice", None, True), (["2"], "alice", None, True),
                                         (["3"], "alice", None, True), (["4"], "alice", None, True)])
        assert alice.sql(mine + "and key <> '[\"4\"]' order by key") == ids
        editor.execute("update public.doc_f set body = body || '.' where id > 50")  # 150 rows
        tb.wait_for(lambda: (None, "alice", None, True) in locks(bob, "public.doc_f"), 5,
                    message="a lock on the whole table")
        assert len(locks(bob, "public.doc_f")) == 5
    # The editor's session ended: its locks go.
    wait_locks(bob, "public.doc_f", [], timeout=5.0)
    # A friend's change applied here is not this database's edit: no lock.
    bob.sql("select peer.publish('public.doc_f', 'alice')")
    alice.sql("select peer.subscribe('public.doc_f', 'bob', initial => false)")
    bob.sql("update public.doc_f set body = 'bob was here' where id = 9")
    tb.wait_for(lambda: alice.scalar("select body from public.doc_f where id = 9") == "bob was here", 10,
                message="bob's change applied at alice")
    assert locks(alice, "public.doc_f") == []
    # With no worker, the write still succeeds; no lock is taken.
    alice.sql("select peer.stop_worker()")
    try:
        alice.sql("update public.doc_f set body = 'offline edit' where id = 7")
        assert alice.scalar("select body from public.doc_f where id = 7") == "offline edit"
    finally:
        alice.sql("select peer.start_worker()")
    assert alice.scalar("select peer.no_auto_soft_lock('public.doc_f')") is True
    assert alice.scalar("select peer.no_auto_soft_lock('public.doc_f')") is False


def test_watch_tells_a_friend_of_locks_on_an_unshared_table(peers):
    alice, bob = peers
    for cluster in (alice, bob):
        cluster.sql("create table public.doc_g (id int primary key)")
    lock_id = alice.scalar("select peer.soft_lock('public.doc_g', '[\"1\"]', session => false)")
    time.sleep(0.5)
    assert locks(bob, "public.doc_g") == []  # not shared: bob is not told
    alice.sql("select peer.watch('public.doc_g', 'bob')")
    wait_locks(bob, "public.doc_g", [(["1"], "alice", None, False)])
    assert alice.scalar("select peer.unwatch('public.doc_g', 'bob')") is True
    wait_locks(bob, "public.doc_g", [])
    alice.sql("select peer.release_lock(%s)", lock_id)


def test_a_flood_of_locks_is_bounded_refused_and_counted(peers):
    alice, bob = peers
    shared_table(alice, bob, "public.doc_h")
    bob.sql("update peer.config set max_soft_locks = 10000, soft_lock_rate = 1000")
    started = time.monotonic()
    alice.sql("select peer._take_locks('public.doc_h'::regclass, "
              "(select jsonb_agg(jsonb_build_array(n::text)) from generate_series(1, 50000) n), null, 600, false)")
    # Every lock over the bound is refused, and counted (a friend's re-sync would count them again).
    tb.wait_for(lambda: bob.sql("select locks_held, locks_refused >= 40000 from peer.presence where friend = 'alice'")
                == [(10000, True)], 30, interval=0.2, message="40,000 of alice's locks refused at bob")
    assert bob.scalar("select count(*) from peer.soft_locks where holder = 'alice'") == 10000
    assert bob.scalar("select extract(epoch from peer.ping_worker())") < 0.5
    lag = bob.scalar("select loop_lag_max_ms from peer.worker_status()")
    print(f"50,000 locks sent and 40,000 refused in {time.monotonic() - started:.1f} s; "
          f"bob's loop lagged {lag:.0f} ms at most")
    assert re.search(r"refused \d+ soft locks from alice", bob.log())
    alice.sql("delete from peer.soft_lock where relation = 'public.doc_h'::regclass")
    # (alice's worker tells bob only of what it releases itself: bob's copies expire with the link)
    bob.sql("delete from peer.soft_lock where holder = 'alice'; update peer.friend_presence set locks_refused = 0")


def test_presence_shows_online_status_and_offline_within_ten_seconds(peers):
    alice, bob = peers
    alice.sql("select peer.set_status('reviewing widget')")
    tb.wait_for(lambda: bob.sql("select online, status from peer.presence where friend = 'alice'")
                == [(True, "reviewing widget")], 5, message="alice online and reviewing at bob")
    # The offerer measures the round trip on a quiet link, and tells the other side with its next ping.
    tb.wait_for(lambda: bob.scalar("select rtt_ms from peer.presence where friend = 'alice'") is not None, 10,
                interval=0.2, message="a round trip to alice at bob")
    alice.sql("select peer.stop_worker()")
    started = time.monotonic()
    try:
        tb.wait_for(lambda: bob.scalar("select online from peer.presence where friend = 'alice'") is False,
                    10, interval=0.2, message="alice offline at bob")
        print(f"offline after {time.monotonic() - started:.1f} s")
        assert bob.scalar("select last_seen > now() - interval '15 s' from peer.presence where friend = 'alice'")
        assert alice.sql("select friend, online from peer.presence") == [("bob", False)]  # no worker here
    finally:
        alice.sql("select peer.start_worker()")
        alice.sql("select peer.set_status(null)")
    tb.wait_connected(bob, "alice")
    tb.wait_for(lambda: bob.sql("select online, status from peer.presence where friend = 'alice'")
                == [(True, None)], 10, message="alice back, with no status")


def test_a_killed_holders_locks_expire_after_their_ttl(peers):
    """Runs last: kill -9 of alice's whole server."""
    alice, bob = peers
    shared_table(alice, bob, "public.doc_z")
    session = alice.connect(autocommit=True)
    session.execute("select peer.soft_lock('public.doc_z', '[\"1\"]', ttl => '4 s')")
    wait_locks(bob, "public.doc_z", [(["1"], "alice", None, True)])
    alice.kill9()
    killed = time.monotonic()
    # Bob's link notices within DEAD_AFTER_S (7 s); the lock then lives its 4 s TTL.
    tb.wait_for(lambda: locks(bob, "public.doc_z") == [(["1"], "alice", None, False)], 10, interval=0.1,
                message="the lease of alice's lock to start running out")
    expiring = time.monotonic()
    assert bob.scalar("select online from peer.presence where friend = 'alice'") is False
    assert expiring - killed < 10
    wait_locks(bob, "public.doc_z", [], timeout=8.0)
    gone = time.monotonic()
    print(f"link dead after {expiring - killed:.1f} s, lock gone {gone - expiring:.1f} s later")
    assert gone - expiring >= 2.5  # the TTL, not at once
    alice.start()
    tb.wait_connected(bob, "alice")
    assert locks(alice, "public.doc_z") == []  # unlogged: gone with the crash
    assert locks(bob, "public.doc_z") == []
