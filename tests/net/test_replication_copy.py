"""The initial copy of a subscription: in chunks, checkpointed, converging with the changes
made while it runs, resumed after either server restarts.

Real clusters, a real signaling server and real aiortc on loopback: alice publishes, bob
subscribes.  Each test uses tables of its own.
"""

import json
import threading
import time

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}
FRIEND_ROLE = "aq_replica"


@pytest.fixture(scope="module")
def pair(module_testbed, module_signal_server):
    alice, bob = module_testbed.alice, module_testbed.bob
    tb.connected_friends(alice, bob, module_signal_server.url, FRIEND_ROLE)
    return alice, bob


@pytest.fixture
def peers(pair):
    alice, _ = pair
    tb.wait_connected(alice, "bob", timeout=60)
    return pair


def make_table(clusters, name, rows):
    for cluster in clusters:
        cluster.sql(f"create table {name} (id int primary key, a text, b int, note text)")
        cluster.sql(f"grant select, insert, update, delete on {name} to {FRIEND_ROLE}")
    clusters[0].sql(f"insert into {name} select g, 'a' || g, g, 'note ' || g from generate_series(1, {rows}) g")


def copy_in_chunks(alice, bob, name, rows, chunk_rows):
    """A table of rows rows published by alice and subscribed by bob, copied chunk_rows at a time."""
    make_table((alice, bob), name, rows)
    alice.sql("update peer.config set copy_chunk_rows = %s", chunk_rows)
    alice.sql(f"select peer.publish('{name}', 'bob')")
    bob.sql(f"select peer.subscribe('{name}', 'alice')")


def table_rows(cluster, name):
    return cluster.sql(f"select * from {name} order by id")


def copy_status(bob, name):
    """bob's copy of the table: (state in peer.subscriptions, rows copied, chunks applied)."""
    return bob.sql("select v.state, s.copy_rows, s.copy_chunks from peer.subscriptions v "
                   "join peer.subscription s using (relation, friend) where s.relation = %s::regclass", name)[0]


def wait_copied(bob, name, timeout=60):
    tb.wait_for(lambda: copy_status(bob, name)[0] == "streaming", timeout, interval=0.1,
                message=f"the copy of {name} to end", ignore=(psycopg.Error,))


def chunks_served(alice, name):
    """The chunks alice queued for bob's copies of the table: the key each started after."""
    return [json.loads(r[0]) if r[0] is not None else None for r in alice.sql(
        "select payload -> 'chunk' ->> 'after' from peer.outbox_message "
        "where friend = 'bob' and topic = 'aquapeer.changes' and payload ->> 'r' = %s and payload ? 'chunk' "
        "order by position", name)]


# --------------------------------------------------------------------------

def test_a_copy_in_chunks_shows_progress_and_converges_with_changes_made_meanwhile(peers):
    alice, bob = peers
    name = "public.copied_live"
    make_table((alice, bob), name, 30000)
    alice.sql(f"analyze {name}")  # the estimate of the rows to copy is the planner's
    alice.sql("update peer.config set copy_chunk_rows = 2000")
    alice.sql(f"select peer.publish('{name}', 'bob')")
    progress, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            with bob.connect() as conn:
                progress.extend(conn.execute("select state, rows_done, rows_total from peer.transfers "
                                             "where relation = %s::regclass", (name,)).fetchall())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        started = time.monotonic()
        bob.sql(f"select peer.subscribe('{name}', 'alice')")
        assert copy_status(bob, name)[0] == "initializing"
        # While it runs: rows it has copied and rows it has not, updated, deleted, inserted.
        with alice.connect() as conn:
            conn.autocommit = True
            for i in range(10):
                conn.execute(f"update {name} set a = 'changed' where id %% 1000 = %s", (i * 97,))
                conn.execute(f"delete from {name} where id %% 1000 = %s", (i * 97 + 1,))
                conn.execute(f"insert into {name} select g, 'new', g, null from generate_series(%s::int, %s::int) g",
                             (30001 + i * 100, 30100 + i * 100))
                conn.execute(f"update {name} set b = -b where id between %s and %s", (29000 - i * 10, 29009 - i * 10))
        wait_copied(bob, name)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()
    tb.wait_for(lambda: table_rows(bob, name) == table_rows(alice, name), 60, interval=0.2,
                message="bob's table to be alice's")
    assert bob.sql(f"select * from peer.verify_subscription('{name}', 'alice')") == []
    # Progress in peer.transfers: rows copied so far of about 30,000, then done.
    running = [(done, total) for state, done, total in progress if state == "running"]
    assert any(0 < done < 30000 for done, _total in running), progress
    assert all(25000 <= total <= 40000 for _done, total in running if total is not None), running
    final = bob.sql("select state, rows_done, rows_total, direction from peer.transfers where relation = %s::regclass",
                    name)
    assert final == [("done", final[0][1], final[0][1], "copy")]
    # One chunk per 2,000 rows, each asked for once, each read in a transaction of its own.
    served = chunks_served(alice, name)
    assert served[0] is None and None not in served[1:]
    assert len(served) == copy_status(bob, name)[2] == -(-final[0][1] // 2000)
    assert bob.scalar("select count(*) from peer.change_ahead_of_copy") == 0
    print(f"copied {final[0][1]} rows in {len(served)} chunks in {elapsed:.1f} s")


def test_an_update_that_arrives_before_its_row_waits_for_the_copy(peers):
    """An update committed after the chunk that holds its row was read can reach the
    subscriber before that chunk.  Made here by hand: an update of the row that alice's
    capture does not see, and the change it would have sent delivered to bob at once."""
    alice, bob = peers
    name = "public.copied_late"
    copy_in_chunks(alice, bob, name, 20000, chunk_rows=1000)
    stamp, origin = alice.sql("select peer._clock_tick(), peer_id from peer.identity")[0]
    bob.sql("insert into peer.inbox (id, friend, topic, payload, sent_at, handler) "
            "values (gen_random_uuid(), 'alice', 'aquapeer.changes', %s::jsonb, now(), "
            "'peer._apply_changes(peer.inbox)'::regprocedure)",
            json.dumps({"r": name, "c": stamp, "o": origin, "end": True,
                        "rows": [{"op": "U", "k": {"id": 19999}, "v": {"a": "early"}}]}))
    tb.wait_for(lambda: bob.scalar("select count(*) from peer.change_ahead_of_copy") == 1, 30,
                message="the update to wait for its row")
    wait_copied(bob, name)
    assert bob.sql(f"select * from {name} where id = 19999") == [(19999, "early", 19999, "note 19999")]
    assert bob.scalar("select count(*) from peer.change_ahead_of_copy") == 0
    with alice.connect() as conn:  # what alice's update wrote, where its capture does not see it
        conn.execute("set session_replication_role = replica")
        conn.execute(f"update {name} set a = 'early' where id = 19999")
        conn.commit()
    assert bob.sql(f"select * from peer.verify_subscription('{name}', 'alice')") == []


def test_a_copy_resumes_from_its_checkpoint_after_either_server_restarts(peers):
    alice, bob = peers
    name = "public.copied_twice_stopped"
    copy_in_chunks(alice, bob, name, 30000, chunk_rows=1000)

    def copied_at_least(rows):
        tb.wait_for(lambda: copy_status(bob, name)[1] >= rows, 60, interval=0.02,
                    message=f"{rows} rows to be copied", ignore=(psycopg.Error,))

    copied_at_least(5000)
    bob.kill9()
    bob.start()
    copied_at_least(copy_status(bob, name)[1] + 1)  # going on
    alice.sql("update public.copied_twice_stopped set note = 'while alice was away' where id > 29000")
    at_stop = copy_status(bob, name)[1]
    assert at_stop < 30000
    alice.stop()
    alice.start()
    tb.wait_connected(alice, "bob", timeout=60)
    wait_copied(bob, name, timeout=90)
    tb.wait_for(lambda: table_rows(bob, name) == table_rows(alice, name), 60, interval=0.2,
                message="bob's table to be alice's", ignore=(psycopg.Error,))
    assert bob.sql(f"select * from peer.verify_subscription('{name}', 'alice')") == []
    # Never from zero: each of the 30 chunks was read once, the first from the first row.
    served = chunks_served(alice, name)
    assert len(served) == 30 and served[0] is None and None not in served[1:]
    assert copy_status(bob, name) == ("streaming", 30000, 30)
    print(f"alice stopped when bob had copied {at_stop} rows")


def test_a_friend_away_past_change_retention_resyncs_only_the_rows_that_differ(peers):
    alice, bob = peers
    name = "public.resynced"
    make_table((alice, bob), name, 10000)
    alice.sql(f"select peer.publish('{name}', 'bob')")
    bob.sql(f"select peer.subscribe('{name}', 'alice')")
    wait_copied(bob, name)
    alice.sql(f"update {name} set note = 'streamed' where id <= 10")
    tb.wait_for(lambda: bob.scalar(f"select count(*) from {name} where note = 'streamed'") == 10, 30,
                message="a change to stream")
    bob.stop()
    alice.sql("update peer.config set change_retention = '1 s'")
    try:
        with alice.connect() as conn:
            conn.autocommit = True
            conn.execute(f"update {name} set a = 'while bob was away' where id between 1001 and 1100")
            conn.execute(f"delete from {name} where id between 2001 and 2050")
            conn.execute(f"insert into {name} select g, 'new', g, null from generate_series(10001, 10030) g")
        time.sleep(1.5)
        # what the outbox's retention runs every 5 minutes: those changes are dropped, bob is told
        assert alice.sql("select friend, n from peer._expire_changes()") == [("bob", 3)]
    finally:
        alice.sql("update peer.config set change_retention = default")
    alice.sql(f"update {name} set b = -1 where id in (5, 1005, 10005)")  # after the drop: streamed as usual
    bob.start()
    tb.wait_connected(alice, "bob", timeout=60)
    tb.wait_for(lambda: copy_status(bob, name)[0] == "streaming"
                and bob.scalar("select direction from peer.transfers where relation = %s::regclass", name) == "resync",
                60, interval=0.1, message="the re-sync to end", ignore=(psycopg.Error,))
    tb.wait_for(lambda: table_rows(bob, name) == table_rows(alice, name), 60, interval=0.2,
                message="bob's table to be alice's", ignore=(psycopg.Error,))
    assert bob.sql(f"select * from peer.verify_subscription('{name}', 'alice')") == []
    # Only what differed moved: the 100 rows updated and the 30 inserted (the 50 deleted went
    # here), and row 5, whose change after the drop was still on its way when they were compared.
    assert bob.sql("select state, rows_done, rows_total from peer.transfers where relation = %s::regclass",
                   name) == [("done", 131, 131)]
    assert bob.scalar("select count(*) from peer.resync_key") == 0


def test_a_copy_asks_again_when_the_publisher_failed_on_its_request(peers):
    alice, bob = peers
    name = "public.copied_after_a_failure"
    make_table((alice, bob), name, 5000)
    alice.sql("update peer.config set copy_chunk_rows = 1000, handler_timeout = '1 s'")
    bob.sql("update peer.config set handler_timeout = '2 s'")  # asks again after 4 s without an answer
    alice.sql(f"select peer.publish('{name}', 'bob')")
    try:
        with alice.connect(autocommit=False) as conn:
            # the publisher's handler times out waiting for the table: its request is left failed
            conn.execute(f"lock table {name} in access exclusive mode")
            bob.sql(f"select peer.subscribe('{name}', 'alice')")
            tb.wait_for(lambda: alice.scalar("select handler_error from peer.inbox where topic = 'aquapeer.copy' "
                                             "and payload ->> 'r' = %s", name), 30,
                        message="the publisher's handler to fail")
            conn.rollback()
        wait_copied(bob, name, timeout=60)
    finally:
        alice.sql("update peer.config set handler_timeout = default")
        bob.sql("update peer.config set handler_timeout = default")
    assert table_rows(bob, name) == table_rows(alice, name)
    assert copy_status(bob, name) == ("streaming", 5000, 5)
    assert bob.scalar("select count(*) from peer.outbox where topic = 'aquapeer.copy' and payload ->> 'r' = %s "
                      "and payload -> 'after' = 'null'", name) == 2  # the first chunk, asked for twice
    assert chunks_served(alice, name)[0] is None and len(chunks_served(alice, name)) == 5
    assert alice.scalar("select count(*) from peer.inbox where topic = 'aquapeer.copy' and handler_error is null") == 0


def test_friends_of_0_20_0_copy_the_old_way(peers):
    """0.20.0 asked for every row at once and sent them so: a request without "after", and
    copy messages without copy_id.  Both are made here by hand."""
    alice, bob = peers
    name = "public.copied_the_old_way"
    make_table((alice, bob), name, 2500)
    alice.sql("update peer.config set copy_chunk_rows = 1000")
    alice.sql(f"select peer.publish('{name}', 'bob')")
    # a subscriber of 0.20.0: one request, every row in one transaction (in chunks, one after the other)
    bob.sql(f"select peer.subscribe('{name}', 'alice', initial => false)")
    alice.sql("insert into peer.inbox (id, friend, topic, payload, sent_at, handler) "
              "values (gen_random_uuid(), 'bob', 'aquapeer.copy', %s::jsonb, now(), "
              "'peer._copy_rows(peer.inbox)'::regprocedure)", json.dumps({"r": name}))
    tb.wait_for(lambda: table_rows(bob, name) == table_rows(alice, name), 30, interval=0.2,
                message="every row at once")
    assert alice.scalar("select count(distinct xact) from peer.outbox_message "
                        "where topic = 'aquapeer.changes' and payload ->> 'r' = %s", name) == 1
    # a publisher of 0.20.0: its copy ends the subscription's initializing when it is applied
    other = "public.copied_from_the_old_way"
    make_table((alice, bob), other, 0)
    bob.sql(f"select peer.subscribe('{other}', 'alice')")  # alice does not publish it: no chunk comes
    origin = alice.scalar("select peer_id from peer.identity")
    bob.sql("insert into peer.inbox (id, friend, topic, payload, sent_at, handler) "
            "values (gen_random_uuid(), 'alice', 'aquapeer.changes', %s::jsonb, now(), "
            "'peer._apply_changes(peer.inbox)'::regprocedure)",
            json.dumps({"r": other, "copy": True, "c": 0, "o": origin, "end": True,
                        "rows": [{"op": "I", "k": {"id": 1}, "v": {"id": 1, "a": "old", "b": 1, "note": None}}]}))
    wait_copied(bob, other, timeout=30)
    assert table_rows(bob, other) == [(1, "old", 1, None)]
    assert copy_status(bob, other) == ("streaming", 1, 1)
