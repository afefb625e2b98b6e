"""Following a friend's bundle: peer.follow_bundle pulls each new commit by itself, over real
aiortc between real clusters.

alice owns the bundle "shop" and shares it with bob; bob follows it.
"""

import time

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}

TABLES = """
    create table public.maker (id int primary key, name text not null);
    create table public.widget (id int primary key, name text, price numeric, maker int references public.maker);
"""

# A followed commit arrives within about a second; executors may have to start first.
ARRIVES_S = 15


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
    """alice's bundle shop: 3 makers and 20 widgets, committed and shared with bob."""
    alice, bob = pair
    alice.sql("insert into public.maker values (1, 'acme'), (2, 'globex'), (3, 'initech')")
    alice.sql("insert into public.widget select n, 'widget ' || n, n * 1.25, 1 + n % 3 from generate_series(1, 20) n")
    alice.sql("select bundle.create('shop'); select bundle.track('shop', 'public.maker'); "
              "select bundle.track('shop', 'public.widget')")
    alice.sql("select bundle.commit('shop', 'first')")
    alice.sql("select peer.share_bundle('shop', 'bob')")
    yield alice, bob
    bob.sql("delete from peer.bundle_follow")
    for cluster in (alice, bob):
        cluster.sql("delete from bundle.bundle; delete from bundle.changed_key; delete from peer.transfer")
        cluster.sql("truncate public.widget, public.maker")


def head(cluster):
    return cluster.scalar("select head from bundle.bundle where name = 'shop'")


def followed(bob):
    rows = bob.sql("select state, last_error, commits_behind_checkout, commits_not_merged, last_head "
                   "from peer.followed_bundles where friend = 'alice' and bundle = 'shop'")
    return rows[0] if rows else None


def wait_name(cluster, widget, name, timeout=ARRIVES_S):
    tb.wait_for(lambda: cluster.scalar("select name from public.widget where id = %s", widget) == name, timeout,
                interval=0.1, message=f"widget {widget} to be named {name!r} at {cluster.name}",
                ignore=(psycopg.Error,))


def test_following_takes_each_new_commit_by_itself(shop):
    alice, bob = shop
    assert bob.scalar("select peer.follow_bundle('alice', 'shop')") is True
    assert bob.scalar("select peer.follow_bundle('alice', 'shop')") is False
    # The first pull clones it, tables and all.
    tb.wait_for(lambda: head(bob) == head(alice), 30, interval=0.1, message="bob's clone of shop")
    assert bob.sql("select * from public.widget order by id") == alice.sql("select * from public.widget order by id")
    for n in (1, 2, 3):
        alice.sql("update public.widget set name = %s where id = %s", f"change {n}", n)
        alice.sql("select bundle.commit('shop', %s)", f"change {n}")
        wait_name(bob, n, f"change {n}")
    tb.wait_for(lambda: head(bob) == head(alice), ARRIVES_S, interval=0.1, message="bob's head to be alice's")
    assert bob.sql("select name from public.widget where id <= 3 order by id") == \
        [("change 1",), ("change 2",), ("change 3",)]
    assert bob.sql("select commit_id from bundle.log('shop')") == alice.sql("select commit_id from bundle.log('shop')")
    assert bob.scalar("select checked_out from bundle.bundle where name = 'shop'") == head(alice)
    tb.wait_for(lambda: followed(bob)[:4] == ("following", None, 0, 0), ARRIVES_S, interval=0.1,
                message="the follow to be up to date")
    assert bob.sql("select direction, state from peer.transfers") == [("pull", "done")] * 4


def test_uncommitted_changes_keep_the_commits_without_checkout(shop):
    alice, bob = shop
    bob.sql("select peer.follow_bundle('alice', 'shop')")
    tb.wait_for(lambda: head(bob) == head(alice), 30, interval=0.1, message="bob's clone of shop")
    bob.sql("update public.widget set name = 'mine' where id = 5")
    alice.sql("update public.widget set name = 'theirs' where id = 1")
    alice.sql("select bundle.commit('shop', 'second')")
    alice.sql("update public.widget set name = 'theirs again' where id = 2")
    theirs = alice.scalar("select bundle.commit('shop', 'third')")
    tb.wait_for(lambda: head(bob) == theirs, 30, interval=0.1, message="alice's commits kept at bob's")
    tb.wait_for(lambda: (followed(bob) or ())[:1] == ("behind",), ARRIVES_S, interval=0.1, message="state behind")
    state, error, behind, not_merged, last_head = followed(bob)
    assert behind == 2 and not_merged == 0 and last_head == theirs and "uncommitted changes" in error
    # Not checked out: bob's tables are as they were, his change stays.
    assert bob.sql("select id, name from public.widget where id in (1, 2, 5) order by id") == \
        [(1, "widget 1"), (2, "widget 2"), (5, "mine")]
    assert bob.scalar("select checked_out from bundle.bundle where name = 'shop'") != theirs
    # Once his change is gone, the follow checks out what it kept.
    bob.sql("update public.widget set name = 'widget 5' where id = 5")
    wait_name(bob, 2, "theirs again", timeout=30)
    tb.wait_for(lambda: followed(bob)[:3] == ("following", None, 0), ARRIVES_S, interval=0.1,
                message="the follow to catch up")
    assert bob.scalar("select checked_out from bundle.bundle where name = 'shop'") == theirs


def test_a_merge_with_conflicts_stops_and_records_them(shop):
    alice, bob = shop
    bob.sql("select peer.follow_bundle('alice', 'shop')")
    tb.wait_for(lambda: head(bob) == head(alice), 30, interval=0.1, message="bob's clone of shop")
    bob.sql("update public.widget set price = 2 where id = 10")
    ours = bob.scalar("select bundle.commit('shop', 'bob')")
    alice.sql("update public.widget set price = 1 where id = 10")
    theirs = alice.scalar("select bundle.commit('shop', 'alice')")
    tb.wait_for(lambda: (followed(bob) or ())[:1] == ("conflicts",), 30, interval=0.1, message="state conflicts")
    assert bob.sql("select column_name, ours, theirs from bundle.conflicts") == [("price", "2", "1")]
    assert head(bob) == ours and "conflict" in followed(bob)[1]
    bob.sql("select bundle.resolve('shop', 'public.widget', '[\"10\"]', 'price', 'theirs')")
    merge = bob.scalar("select bundle.commit('shop', 'merged')")
    assert bob.scalar("select parent_ids from bundle.log('shop') where commit_id = %s", merge) == [ours, theirs]
    tb.wait_for(lambda: followed(bob)[:2] == ("following", None), ARRIVES_S, interval=0.1,
                message="the follow to go on after the merge")
    assert head(bob) == merge


def test_unfollowing_stops_it(shop):
    alice, bob = shop
    bob.sql("select peer.follow_bundle('alice', 'shop')")
    tb.wait_for(lambda: head(bob) == head(alice), 30, interval=0.1, message="bob's clone of shop")
    assert bob.scalar("select peer.unfollow_bundle('alice', 'shop')") is True
    assert bob.scalar("select peer.unfollow_bundle('alice', 'shop')") is False
    before = head(bob)
    alice.sql("update public.widget set name = 'after unfollow' where id = 1")
    alice.sql("select bundle.commit('shop', 'after')")
    time.sleep(4)  # four times as long as a followed commit takes
    assert head(bob) == before
    assert bob.scalar("select name from public.widget where id = 1") == "widget 1"
    assert bob.sql("select * from peer.followed_bundles") == []


def test_an_unknown_friend_or_a_bad_name_is_refused(shop):
    _alice, bob = shop
    with pytest.raises(psycopg.errors.UndefinedObject, match='unknown friend "carol"'):
        bob.sql("select peer.follow_bundle('carol', 'shop')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid bundle name 'Shop!'"):
        bob.sql("select peer.follow_bundle('alice', 'Shop!')")
    assert bob.sql("select * from peer.bundle_follow") == []


def test_an_unshared_bundle_is_an_error_the_view_shows(shop):
    alice, bob = shop
    bob.sql("select peer.follow_bundle('alice', 'nosuch')")
    tb.wait_for(lambda: bob.scalar("select state from peer.followed_bundles where bundle = 'nosuch'") == "error",
                ARRIVES_S, interval=0.1, message="state error")
    assert "is not shared with you" in bob.scalar("select last_error from peer.followed_bundles")
    # It leaves nothing behind.
    assert bob.sql("select name from bundle.bundle") == []
