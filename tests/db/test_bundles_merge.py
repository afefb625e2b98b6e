"""Bundles between two real clusters without the network: commits and objects copied by hand, then
bundle._integrate (fast-forward, up to date, three-way merge), conflicts, resolve and merge_abort."""

import psycopg
import pytest
from psycopg.types.json import Jsonb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}

TABLES = """
    create table s.widget (sku text primary key, name text, price numeric);
    create table s.part (widget text references s.widget on delete cascade, n int, kind text, primary key (widget, n));
"""


@pytest.fixture(scope="module")
def pair(module_testbed):
    for cluster in (module_testbed.alice, module_testbed.bob):
        cluster.sql("create extension aquapeer cascade")
    return module_testbed.alice, module_testbed.bob


@pytest.fixture
def shop(pair):
    """Bundle b on both, alice's first commit integrated (a clone) by bob."""
    alice, bob = pair
    try:
        for cluster in (alice, bob):
            cluster.sql("create schema s")
            cluster.sql(TABLES)
            cluster.sql("select bundle.create('b')")
            cluster.sql("select bundle.track('b', 's.widget'), bundle.track('b', 's.part')")
        alice.sql("insert into s.widget values ('w1', 'bolt', 1), ('w2', 'nut', 2), ('w3', 'gear', 3); "
                  "insert into s.part values ('w1', 1, 'a'), ('w1', 2, 'b'), ('w2', 1, 'c')")
        base = alice.scalar("select bundle.commit('b', 'base')")
        send(alice, bob)
        assert integrate(bob, base) == {"fast_forward": True, "up_to_date": False, "conflicts": 0, "head": base,
                                        "merging": False}
        assert tables(bob) == tables(alice)
        yield alice, bob, base
    finally:
        for cluster in (alice, bob):
            cluster.sql("delete from bundle.bundle where name = 'b'; drop schema if exists s cascade")


def send(src, dst):
    """Copy what src has of bundle b to dst, as a pull would: objects, then commits."""
    objects = src.sql("select id, data from bundle.object where bundle = 'b' and kind <> 'commit'")
    dst.sql("select count(*) from bundle._keep('b', %s::text[], %s::bytea[])",
            [o[0] for o in objects], [o[1] for o in objects])
    dst.sql("select bundle._promote('b', %s::text[])",
            [r[0] for r in src.sql("select tree from bundle.commit where bundle = 'b'")])
    dst.sql("select bundle._keep_commits('b', %s)",
            Jsonb(src.scalar("select jsonb_agg(document) from bundle.commit where bundle = 'b'")))


def integrate(cluster, theirs, checkout=True):
    return cluster.scalar("select bundle._integrate('b', %s, %s)", theirs, checkout)


def head(cluster):
    return cluster.scalar("select head from bundle.bundle where name = 'b'")


def tables(cluster):
    return (cluster.sql("select * from s.widget order by 1"), cluster.sql("select * from s.part order by 1, 2"))


def status(cluster):
    return cluster.sql("select relation::text, key::text, change from bundle.status('b')")


def conflicts(cluster):
    return cluster.sql("select relation::text, key::text, column_name, base, ours, theirs from bundle.conflicts "
                       "where bundle = 'b' order by 1, 2, 3")


def test_fast_forward_and_up_to_date(shop):
    alice, bob, base = shop
    alice.sql("update s.widget set price = 10 where sku = 'w1'; insert into s.part values ('w3', 1, 'd')")
    second = alice.scalar("select bundle.commit('b', 'second')")
    send(alice, bob)
    # Without checkout (what a friend's push does): only the head moves.
    before = tables(bob)
    assert integrate(bob, second, checkout=False) == {"fast_forward": True, "up_to_date": False, "conflicts": 0,
                                                      "head": second, "merging": False}
    assert tables(bob) == before
    assert bob.sql("select checked_out from bundle.bundle where name = 'b'") == [(base,)]
    assert bob.scalar("select bundle.checkout('b')") == second
    assert tables(bob) == tables(alice)
    assert integrate(bob, base)["up_to_date"] is True
    assert integrate(bob, second)["up_to_date"] is True
    assert head(bob) == second

    alice.sql("delete from s.widget where sku = 'w2'")
    third = alice.scalar("select bundle.commit('b', 'third')")
    send(alice, bob)
    bob.sql("update s.widget set name = 'mine' where sku = 'w3'")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="1 uncommitted change") as e:
        integrate(bob, third)
    assert "checkout => false" in e.value.diag.message_hint
    bob.sql("update s.widget set name = 'gear' where sku = 'w3'")
    assert integrate(bob, third) == {"fast_forward": True, "up_to_date": False, "conflicts": 0, "head": third,
                                     "merging": False}
    assert tables(bob) == tables(alice)
    assert status(bob) == []


def test_a_clean_merge_of_different_fields_and_rows(shop):
    alice, bob, base = shop
    alice.sql("update s.widget set price = 10 where sku = 'w1'; insert into s.part values ('w3', 1, 'd'); "
              "update s.part set kind = 'A' where widget = 'w1' and n = 1")
    theirs = alice.scalar("select bundle.commit('b', 'alice')")
    bob.sql("update s.widget set name = 'BOLT' where sku = 'w1'; delete from s.widget where sku = 'w2'; "
            "update s.part set kind = 'B' where widget = 'w1' and n = 2")
    ours = bob.scalar("select bundle.commit('b', 'bob')")
    send(alice, bob)
    # Diverged, without checkout: nothing happens.
    assert integrate(bob, theirs, checkout=False) == {"fast_forward": False, "up_to_date": False, "conflicts": 0,
                                                      "head": ours, "merging": False}
    assert bob.sql("select * from bundle.merge") == []
    assert integrate(bob, theirs) == {"fast_forward": False, "up_to_date": False, "conflicts": 0, "head": ours,
                                      "merging": True}
    assert tables(bob) == ([("w1", "BOLT", 10), ("w3", "gear", 3)],
                           [("w1", 1, "A"), ("w1", 2, "B"), ("w3", 1, "d")])
    assert head(bob) == ours
    notices = []
    with bob.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        changed = conn.execute("select relation::text, key::text, change from bundle.status('b')").fetchall()
    assert changed == [("s.part", '["w1", "1"]', "modified"), ("s.part", '["w3", "1"]', "added"),
                       ("s.widget", '["w1"]', "modified")]
    assert notices == [f'bundle "b": merge of commit {theirs} in progress, 0 unresolved conflict(s)']
    merged = bob.scalar("select bundle.commit('b', 'merge')")
    assert bob.sql("select commit_id, parent_ids, rows_changed from bundle.log('b') limit 1") == [
        (merged, [ours, theirs], 3)]
    assert bob.sql("select * from bundle.merge") == []
    assert status(bob) == []
    # Alice fast-forwards to the merge and gets the same tables.
    send(bob, alice)
    assert integrate(alice, merged)["fast_forward"] is True
    assert tables(alice) == tables(bob)


def test_conflicts_on_the_same_field_resolved_ours_theirs_and_value(shop):
    alice, bob, base = shop
    alice.sql("update s.widget set price = price + 100, name = name || '!'; "
              "update s.part set kind = 'alice' where widget = 'w1' and n = 1")
    theirs = alice.scalar("select bundle.commit('b', 'alice')")
    bob.sql("update s.widget set price = price + 200; update s.part set kind = 'bob' where widget = 'w1' and n = 1")
    ours = bob.scalar("select bundle.commit('b', 'bob')")
    send(alice, bob)
    assert integrate(bob, theirs)["conflicts"] == 4
    assert conflicts(bob) == [
        ("s.part", '["w1", "1"]', "kind", "a", "bob", "alice"),
        ("s.widget", '["w1"]', "price", "1", "201", "101"),
        ("s.widget", '["w2"]', "price", "2", "202", "102"),
        ("s.widget", '["w3"]', "price", "3", "203", "103"),
    ]
    # Ours kept until resolved; the other field merged.
    assert tables(bob)[0] == [("w1", "bolt!", 201), ("w2", "nut!", 202), ("w3", "gear!", 203)]
    assert ("s.widget", '["w1"]', "conflict") in status(bob)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="4 unresolved conflict") as e:
        bob.sql("select bundle.commit('b', 'too soon')")
    assert "bundle.resolve" in e.value.diag.message_hint
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="merge of commit .* in progress"):
        bob.sql("select bundle.checkout('b')")
    resolve = "select bundle.resolve('b', %s::regclass, %s::jsonb, %s, %s, %s)"
    assert bob.scalar(resolve, "s.widget", '["w1"]', "price", "ours", None) == 3
    assert bob.scalar(resolve, "s.widget", '["w2"]', "price", "theirs", None) == 2
    assert bob.scalar(resolve, "s.widget", '["w3"]', "price", "value", "0.5") == 1
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="'ours', 'theirs' or 'value'"):
        bob.sql(resolve, "s.part", '["w1", "1"]', "kind", "mine", None)
    with pytest.raises(psycopg.errors.UndefinedObject, match="no unresolved conflict"):
        bob.sql(resolve, "s.widget", '["w1"]', "price", "ours", None)
    assert bob.scalar(resolve, "s.part", '["w1", "1"]', "kind", "theirs", None) == 0
    assert tables(bob) == ([("w1", "bolt!", 201), ("w2", "nut!", 102), ("w3", "gear!", 0.5)],
                           [("w1", 1, "alice"), ("w1", 2, "b"), ("w2", 1, "c")])
    assert all(change != "conflict" for _r, _k, change in status(bob))
    merged = bob.scalar("select bundle.commit('b', 'merged')")
    newest = bob.sql("select commit_id, parent_ids, message from bundle.log('b')")[0]
    assert newest == (merged, [ours, theirs], "merged")
    assert {c for c, *_ in bob.sql("select commit_id from bundle.log('b')")} == {merged, ours, theirs, base}


def test_delete_against_update_is_a_conflict_of_the_whole_row(shop):
    alice, bob, base = shop
    alice.sql("delete from s.part where widget = 'w1' and n = 1; update s.part set kind = 'Z' where widget = 'w2'")
    theirs = alice.scalar("select bundle.commit('b', 'alice')")
    bob.sql("update s.part set kind = 'Y' where widget = 'w1' and n = 1; delete from s.part where widget = 'w2'")
    bob.scalar("select bundle.commit('b', 'bob')")
    send(alice, bob)
    assert integrate(bob, theirs)["conflicts"] == 2
    assert conflicts(bob) == [
        ("s.part", '["w1", "1"]', None, '{"n": "1", "kind": "a", "widget": "w1"}',
         '{"n": "1", "kind": "Y", "widget": "w1"}', None),
        ("s.part", '["w2", "1"]', None, '{"n": "1", "kind": "c", "widget": "w2"}', None,
         '{"n": "1", "kind": "Z", "widget": "w2"}'),
    ]
    # Ours kept: our update, and our delete.
    assert tables(bob)[1] == [("w1", 1, "Y"), ("w1", 2, "b")]
    resolve = "select bundle.resolve('b', 's.part', %s::jsonb, null, %s)"
    bob.sql(resolve, '["w1", "1"]', "theirs")  # their delete
    with pytest.raises(psycopg.errors.InvalidParameterValue, match='has the key \\["w9", "1"\\]'):
        bob.sql("select bundle.resolve('b', 's.part', '[\"w2\", \"1\"]', null, 'value', "
                "'{\"widget\": \"w9\", \"n\": \"1\"}')")
    bob.sql(resolve, '["w2", "1"]', "theirs")  # their update brings the row back
    assert tables(bob)[1] == [("w1", 2, "b"), ("w2", 1, "Z")]
    merged = bob.scalar("select bundle.commit('b', 'm')")
    assert bob.scalar("select rows_changed from bundle.log('b') where commit_id = %s", merged) == 2


def test_merge_abort_restores_the_tables(shop):
    alice, bob, base = shop
    alice.sql("update s.widget set price = 7; insert into s.widget values ('w4', 'cog', 4); "
              "insert into s.part values ('w4', 1, 'e')")
    theirs = alice.scalar("select bundle.commit('b', 'alice')")
    bob.sql("update s.widget set price = 8 where sku = 'w1'; delete from s.part where widget = 'w2'")
    ours = bob.scalar("select bundle.commit('b', 'bob')")
    at_ours = tables(bob)
    send(alice, bob)
    assert integrate(bob, theirs)["conflicts"] == 1
    assert tables(bob) != at_ours
    bob.sql("update s.widget set name = 'meanwhile' where sku = 'w3'")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="merge of commit .* in progress"):
        integrate(bob, theirs)
    assert bob.scalar("select bundle.merge_abort('b')") == ours
    assert tables(bob) == at_ours
    assert status(bob) == []
    assert bob.sql("select * from bundle.conflicts") == [] and bob.sql("select * from bundle.merge") == []
    assert head(bob) == ours
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="no merge in progress"):
        bob.sql("select bundle.merge_abort('b')")
