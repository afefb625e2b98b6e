"""Bundles between databases: share, pull, push, over real aiortc between real clusters.

alice owns the bundle "shop"; bob pulls it (and pushes to it when alice lets him).
"""

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}

TABLES = """
    create table public.maker (id int primary key, name text not null);
    create table public.widget (id int primary key, name text, price numeric, tags text[], meta jsonb,
                                maker int references public.maker, updated timestamptz);
"""


def fill(cluster, first, last):
    cluster.sql("insert into public.widget select n, 'widget ' || n, n * 1.25, array['t' || n %% 7], "
                "jsonb_build_object('n', n), 1 + n %% 3, '2026-11-27 10:00:00+00'::timestamptz + n * interval '1 s' "
                "from generate_series(%s::int, %s::int) n", first, last)


@pytest.fixture(scope="module")
def pair(module_testbed, module_signal_server):
    alice, bob = module_testbed.alice, module_testbed.bob
    for cluster in (alice, bob):
        tb.join_signaling(cluster, module_signal_server.url)
        cluster.sql(TABLES)
    tb.befriend(alice, "alice", bob, "bob")
    assert bob.scalar("select peer.connect('alice')") == "connected"
    return alice, bob


@pytest.fixture
def shop(pair):
    """alice's bundle shop: 3 makers and 200 widgets, committed and shared with bob."""
    alice, bob = pair
    alice.sql("insert into public.maker values (1, 'acme'), (2, 'globex'), (3, 'initech')")
    fill(alice, 1, 200)
    alice.sql("select bundle.create('shop'); select bundle.track('shop', 'public.maker'); "
              "select bundle.track('shop', 'public.widget')")
    alice.sql("select bundle.commit('shop', 'first')")
    alice.sql("select peer.share_bundle('shop', 'bob')")
    yield alice, bob
    for cluster in (alice, bob):
        cluster.sql("delete from bundle.bundle; delete from bundle.changed_key; delete from peer.transfer")
        cluster.sql("truncate public.widget, public.maker")


def pull(bob, *args, **kw):
    sql = "select peer.pull_bundle('alice', 'shop'" + "".join(f", {k} => %s" for k in kw) + ")::text"
    return json.loads(bob.scalar(sql, *kw.values()))


def rows(cluster, table="public.widget"):
    return cluster.sql(f"select * from {table} order by 1")


def test_pulling_clones_then_fetches_only_what_changed(shop):
    alice, bob = shop
    first = pull(bob)
    assert first["commits"] == 1 and first["blobs"] == 203 and first["fast_forward"] is True
    assert first["head"] == alice.scalar("select head from bundle.bundle where name = 'shop'")
    assert first["conflicts"] == 0 and first["bytes"] > 0
    assert rows(bob) == rows(alice) and rows(bob, "public.maker") == rows(alice, "public.maker")
    assert bob.sql("select * from bundle.status('shop')") == []
    # bob's copy tracks the same tables and has the same history
    assert bob.sql("select commit_id, message from bundle.log('shop')") == \
        alice.sql("select commit_id, message from bundle.log('shop')")

    alice.sql("update public.widget set price = price + 1 where id in (5, 6); delete from public.widget where id = 7")
    second_head = alice.scalar("select bundle.commit('shop', 'second')")
    second = pull(bob)
    assert second["commits"] == 1 and second["head"] == second_head and second["fast_forward"] is True
    # Only the two changed rows' buckets, and the path above them, crossed the wire.  (The path
    # weighs: the table's node alone, the ids of its ~140 fan nodes, is a fifth of this clone.)
    assert second["blobs"] == 2 and second["objects"] < 20
    assert second["bytes"] < first["bytes"] / 3
    assert rows(bob) == rows(alice)
    again = pull(bob)
    assert again["commits"] == 0 and again["up_to_date"] is True and again["bytes"] == 0
    transfers = bob.sql("select direction, state, rows_done from peer.transfers order by started_at")
    assert [t[:2] for t in transfers] == [("pull", "done")] * 3


def test_the_command_line_pulls_and_prints_a_summary(shop):
    alice, bob = shop
    cli = Path(os.environ.get("AQUAPEER_BINDIR") or "/usr/local/bin") / "aquapeer"
    done = subprocess.run([str(cli), "pull", "--dbname", bob.dsn, "alice", "shop", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["commits"] == 1 and summary["blobs"] == 203 and summary["fast_forward"] is True
    assert rows(bob) == rows(alice)
    failed = subprocess.run([str(cli), "pull", "--dbname", bob.dsn, "alice", "nosuch"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "is not shared with you" in failed.stderr


def test_an_unshared_bundle_is_refused_without_saying_whether_it_exists(shop):
    alice, bob = shop
    alice.sql("select peer.unshare_bundle('shop', 'bob')")
    errors = []
    for name in ("shop", "nosuch"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            bob.sql("select peer.pull_bundle('alice', %s)", name)
        errors.append(str(caught.value).replace(name, "NAME").splitlines()[0])
    assert errors[0] == errors[1] and "is not shared with you" in errors[0]
    assert bob.scalar("select count(*) from bundle.commit") == 0
    # A refused first pull leaves nothing behind: the name stays free.
    assert bob.sql("select name from bundle.bundle") == []
    assert bob.scalar("select bundle.create('nosuch')") == "nosuch"


def test_a_first_pull_refused_for_tables_that_do_not_match_leaves_nothing(shop):
    alice, bob = shop
    alice.sql("create table public.only_here (id int primary key); insert into public.only_here values (1)")
    try:
        alice.sql("select bundle.create('odd'); select bundle.track('odd', 'public.only_here'); "
                  "select bundle.commit('odd', 'first'); select peer.share_bundle('odd', 'bob')")
        with pytest.raises(psycopg.Error, match="do not match"):
            bob.sql("select peer.pull_bundle('alice', 'odd')")
        assert bob.sql("select name from bundle.bundle") == []
        assert bob.scalar("select bundle.create('odd')") == "odd"
    finally:
        alice.sql("delete from bundle.bundle where name = 'odd'; drop table public.only_here")


def test_a_tampered_bucket_is_refused_and_nothing_moves(shop):
    alice, bob = shop
    pull(bob)
    alice.sql("update public.widget set name = 'changed' where id = 9")
    alice.sql("select bundle.commit('shop', 'second')")
    bucket = alice.scalar("select n.id from bundle.head_node n where n.bundle = 'shop' "
                          "and n.path = left(encode(sha256(convert_to('[\"9\"]', 'UTF8')), 'hex'), 4)")
    alice.sql("update bundle.object set data = convert_to(replace(convert_from(data, 'UTF8'), 'changed', 'forged'), "
              "'UTF8') where bundle = 'shop' and id = %s", bucket)
    head = bob.scalar("select head from bundle.bundle where name = 'shop'")
    with pytest.raises(psycopg.errors.DataCorrupted, match=f"object {bucket} does not match its content"):
        pull(bob)
    assert bob.scalar("select head from bundle.bundle where name = 'shop'") == head
    assert bob.scalar("select name from public.widget where id = 9") == "widget 9"
    assert bob.scalar("select count(*) from bundle.object where id = %s", bucket) == 0
    assert bob.scalar("select state from peer.transfers order by started_at desc limit 1") == "failed"


def test_a_commit_with_a_bad_signature_is_refused(shop):
    alice, bob = shop
    alice.sql("update public.widget set name = 'changed' where id = 9")
    commit = alice.scalar("select bundle.commit('shop', 'second')")
    alice.sql("update bundle.commit set document = jsonb_set(document, '{signature}', "
              "to_jsonb(translate(encode(decode(repeat('ab', 64), 'hex'), 'base64'), E'\\n', ''))) "
              "where id = %s", commit)
    with pytest.raises(psycopg.Error, match=f"the signature of commit {commit} does not verify"):
        pull(bob)
    assert bob.scalar("select head from bundle.bundle where name = 'shop'") is None
    assert rows(bob) == []


def test_pulling_with_uncommitted_changes_is_refused_unless_only_fetching(shop):
    alice, bob = shop
    pull(bob)
    alice.sql("update public.widget set name = 'theirs' where id = 1")
    head = alice.scalar("select bundle.commit('shop', 'second')")
    bob.sql("update public.widget set name = 'mine' where id = 2")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="uncommitted changes"):
        pull(bob)
    fetched = pull(bob, checkout=False)
    assert fetched["commits"] == 1 and fetched["fast_forward"] is True and fetched["head"] == head
    assert bob.scalar("select name from public.widget where id = 1") == "widget 1"
    assert bob.scalar("select name from public.widget where id = 2") == "mine"
    assert bob.scalar("select count(*) from bundle.commit where id = %s", head) == 1
    # The tables wait for bundle.checkout.
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not from its head"):
        bob.sql("select bundle.commit('shop', 'mine')")


def test_a_rolled_back_pull_changes_nothing_but_keeps_what_arrived(shop):
    alice, bob = shop
    with bob.connect() as conn:
        with conn.transaction(force_rollback=True):
            summary = json.loads(conn.execute("select peer.pull_bundle('alice', 'shop')::text").fetchone()[0])
            assert summary["commits"] == 1
    assert rows(bob) == []
    assert bob.scalar("select head from bundle.bundle where name = 'shop'") is None
    again = pull(bob)
    assert again["bytes"] < 1000 and again["blobs"] == 0, "what arrived the first time was sent again"
    assert rows(bob) == rows(alice)


def test_push_fast_forwards_the_friends_head_and_never_its_tables(shop):
    alice, bob = shop
    pull(bob)
    bob.sql("update public.widget set name = 'from bob' where id = 3")
    pushed_head = bob.scalar("select bundle.commit('shop', 'bob''s change')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not shared with you for pushing"):
        bob.sql("select peer.push_bundle('alice', 'shop')")
    alice.sql("select peer.share_bundle('shop', 'bob', can_push => true)")
    summary = json.loads(bob.scalar("select peer.push_bundle('alice', 'shop')::text"))
    assert summary["head"] == pushed_head and summary["fast_forward"] is True
    assert alice.scalar("select head from bundle.bundle where name = 'shop'") == pushed_head
    assert alice.scalar("select name from public.widget where id = 3") == "widget 3", "a push touched the tables"
    assert alice.sql("select direction, state from peer.transfers") == [("pushed to us", "done")]
    alice.sql("select bundle.checkout('shop')")
    assert alice.scalar("select name from public.widget where id = 3") == "from bob"
    # alice moves on; bob's next push would not fast-forward her
    alice.sql("update public.widget set name = 'from alice' where id = 4")
    alice.sql("select bundle.commit('shop', 'alice''s change')")
    bob.sql("update public.widget set name = 'bob again' where id = 5")
    bob.sql("select bundle.commit('shop', 'bob''s second')")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="Pull first"):
        bob.sql("select peer.push_bundle('alice', 'shop')")


def test_both_sides_changed_merges_fields_and_records_conflicts(shop):
    alice, bob = shop
    pull(bob)
    alice.sql("update public.widget set name = 'alice name' where id = 10; "
              "update public.widget set price = 1 where id = 11; delete from public.widget where id = 12")
    theirs = alice.scalar("select bundle.commit('shop', 'alice')")
    bob.sql("update public.widget set price = 2 where id = 10; update public.widget set price = 3 where id = 11; "
            "update public.widget set name = 'bob keeps it' where id = 12")
    ours = bob.scalar("select bundle.commit('shop', 'bob')")
    summary = pull(bob)
    assert summary["fast_forward"] is False and summary["conflicts"] == 2 and summary["merging"] is True
    assert summary["head"] == ours
    assert bob.sql("select name, price from public.widget where id = 10") == [("alice name", 2)]
    conflicts = bob.sql("select relation::text, key, column_name, ours, theirs "
                        "from bundle.conflicts order by key::text")
    assert [(c[0], c[1], c[2]) for c in conflicts] == [("widget", ["11"], "price"), ("widget", ["12"], None)]
    bob.sql("select bundle.resolve('shop', 'public.widget', '[\"11\"]', 'price', 'theirs')")
    bob.sql("select bundle.resolve('shop', 'public.widget', '[\"12\"]', null, 'ours')")
    merge = bob.scalar("select bundle.commit('shop', 'merged')")
    assert bob.scalar("select parent_ids from bundle.log('shop') where commit_id = %s", merge) == [ours, theirs]
    assert bob.sql("select price from public.widget where id = 11") == [(1,)]


def test_an_unreachable_friend_is_a_clear_error(shop):
    alice, bob = shop
    alice.stop()
    try:
        bob.sql("select peer.disconnect('alice')")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.SqlclientUnableToEstablishSqlconnection, match="alice is not reachable"):
            bob.sql("select peer.pull_bundle('alice', 'shop')")
        assert time.monotonic() - started < 60
    finally:
        alice.start()
        tb.wait_connected(bob, "alice", timeout=60)


@contextlib.contextmanager
def accepting(bob, max_message_bytes):
    """bob accepts at most max_message_bytes in one message (and 60 KiB more for fragments'
    sake) while connected to alice: what alice answers holds half of that."""
    bob.sql("update peer.config set max_message_bytes = %s", max_message_bytes)
    bob.sql("select peer.disconnect('alice')")
    try:
        assert bob.scalar("select peer.connect('alice')") == "connected"
        yield
    finally:
        bob.sql("update peer.config set max_message_bytes = default; select peer.disconnect('alice')")
        assert bob.scalar("select peer.connect('alice')") == "connected"


def test_a_row_larger_than_the_friend_accepts_in_one_message_is_pulled_in_slices(shop):
    alice, bob = shop
    alice.sql("insert into public.widget (id, name) "
              "select 1000, string_agg(md5(n::text || random()::text), '') from generate_series(1, 90000) n")
    alice.sql("select bundle.commit('shop', 'a large row')")
    with accepting(bob, 1024 * 1024):  # answers of 512 KiB; the row is 2.9 MB
        first = pull(bob)
    assert first["fast_forward"] is True and first["blobs"] == 204
    assert rows(bob) == rows(alice)


def test_commits_come_in_pages_when_one_answer_cannot_hold_them(shop):
    alice, bob = shop
    alice.sql("do $$ begin for n in 1..500 loop "
              "update public.widget set price = price + 1 where id = n % 200 + 1; "
              "perform bundle.commit('shop', 'change ' || n); end loop; end $$")
    with accepting(bob, 8192):  # answers of 4 KiB, half a dozen commits; 500 are 90 KiB compressed
        first = pull(bob)
    assert first["commits"] == 501 and first["fast_forward"] is True
    assert rows(bob) == rows(alice)
    assert bob.sql("select commit_id, parent_ids from bundle.log('shop')") == \
        alice.sql("select commit_id, parent_ids from bundle.log('shop')")


# --------------------------------------------------------------------------
# crashes in the middle of a large pull
# --------------------------------------------------------------------------

LARGE = 60000


@pytest.mark.parametrize("victim", ["puller", "server"])
@pytest.mark.testbed(n=2, names=["alice", "bob"], extra_conf={"synchronous_commit": "on"})
def test_kill_9_mid_pull_then_the_next_pull_sends_nothing_kept(testbed, module_signal_server, victim):
    alice, bob = testbed.alice, testbed.bob
    for cluster in (alice, bob):
        tb.join_signaling(cluster, module_signal_server.url)
        cluster.sql(TABLES)
    tb.befriend(alice, "alice", bob, "bob")
    alice.sql("insert into public.maker values (1, 'acme'), (2, 'globex'), (3, 'initech')")
    fill(alice, 1, LARGE)
    alice.sql("select bundle.create('shop'); select bundle.track('shop', 'public.maker'); "
              "select bundle.track('shop', 'public.widget'); select bundle.commit('shop', 'large'); "
              "select peer.share_bundle('shop', 'bob')")
    tb.wait_connected(bob, "alice", timeout=60)
    total_objects = alice.scalar("select count(*) from bundle.object where kind <> 'commit'")

    failure = []
    puller = threading.Thread(target=lambda: _pull_expecting_failure(bob, failure))
    puller.start()
    tb.wait_for(lambda: (bob.scalar("select max(objects_done) from peer.transfer") or 0) > total_objects // 4, 120,
                interval=0.05, message="the pull to get going")
    (bob if victim == "puller" else alice).kill9()
    puller.join(180)
    assert not puller.is_alive() and failure, "the pull ended without the crash being noticed"
    (bob if victim == "puller" else alice).start()
    tb.wait_connected(bob, "alice", timeout=90)
    kept = bob.scalar("select (select count(*) from bundle.object) + (select count(*) from bundle.pending)")
    assert 0 < kept < total_objects
    assert bob.scalar("select head from bundle.bundle where name = 'shop'") is None
    assert bob.scalar("select count(*) from public.widget") == 0
    tb.wait_for(lambda: bob.scalar("select state from peer.transfers") == "failed", 60,
                message="the broken transfer to show as failed")
    # The name is not taken by what the broken pull left: creating the bundle works (rolled
    # back here, so that the next pull resumes).
    with bob.connect() as conn, conn.transaction(force_rollback=True):
        assert conn.execute("select bundle.create('shop')").fetchone()[0] == "shop"

    second = pull(bob)
    assert second["commits"] == 1 and second["fast_forward"] is True
    # Nothing kept before the crash crossed the wire again.
    assert second["objects"] == total_objects - kept, (second, total_objects, kept)
    assert bob.scalar("select count(*) from public.widget") == LARGE
    assert rows(bob, "public.widget")[-1] == rows(alice, "public.widget")[-1]


def _pull_expecting_failure(bob, failure):
    try:
        pull(bob)
    except psycopg.Error as e:
        failure.append(e)
