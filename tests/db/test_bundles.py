"""Bundles on real clusters: tracking, change capture, row hashes and status (work in progress)."""

import hashlib
import threading

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}

WIDGETS = """
    create table public.widget (sku text primary key, name text, price numeric, made timestamptz,
                                weight float8, tags text[], made_on date, warranty interval, photo bytea);
    insert into public.widget values
        ('w-1', 'widget', 10.50, '2026-11-27 10:00:00+01', 0.1, '{a,b}', '2026-11-27', '1 year 2 days', '\\x00ff'),
        ('w-2', 'gadget', null, null, 1e-7, null, null, null, null);
    create table public.part (widget text, n int, kind text, primary key (widget, n));
    insert into public.part values ('w-1', 1, 'bolt'), ('w-1', 2, 'nut');
    create table public.loose (v text);
"""


@pytest.fixture(scope="module")
def pair(module_testbed):
    alice, bob = module_testbed.alice, module_testbed.bob
    for cluster in (alice, bob):
        cluster.sql("create extension aquapeer cascade")
        cluster.sql(WIDGETS)
    return alice, bob


def hashes(cluster, relation, settings=""):
    with cluster.connect() as conn:
        if settings:
            conn.execute(settings)
        return conn.execute(
            "select h.key::text, h.key_hash, h.blob_id from bundle.tracked t, "
            "bundle._row_hashes(t.relation, t.filter, t.key_columns, null) h "
            "where t.relation = %s::regclass order by 1", (relation,)).fetchall()


@pytest.fixture
def tracked(pair):
    alice, bob = pair
    for cluster in (alice, bob):
        cluster.sql("select bundle.create('shop')")
        cluster.sql("select bundle.track('shop', 'public.widget'), bundle.track('shop', 'public.part')")
    yield alice, bob
    for cluster in (alice, bob):
        cluster.sql("delete from bundle.bundle where name = 'shop'; delete from bundle.changed_key")


def test_a_table_without_a_primary_key_is_refused(pair):
    alice, _ = pair
    alice.sql("select bundle.create('nokey')")
    try:
        with pytest.raises(psycopg.errors.InvalidTableDefinition, match="public.loose has no primary key"):
            alice.sql("select bundle.track('nokey', 'public.loose')")
        with pytest.raises(psycopg.errors.UndefinedObject, match='bundle "nope" does not exist'):
            alice.sql("select bundle.track('nope', 'public.widget')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid bundle name"):
            alice.sql("select bundle.create('No Good')")
    finally:
        alice.sql("delete from bundle.bundle where name = 'nokey'")


def test_a_name_is_created_once_unless_a_broken_pull_left_only_objects(pair):
    alice, _ = pair
    try:
        alice.sql("select bundle.create('twice')")
        with pytest.raises(psycopg.errors.DuplicateObject, match='bundle "twice" already exists'):
            alice.sql("select bundle.create('twice')")
        # What a first pull leaves when it breaks off after objects arrived (the kill -9 tests of
        # tests/net make it for real): a row with no head, nothing tracked, objects kept loose.
        alice.sql("update bundle.bundle set loose_since = now() where name = 'twice'")
        assert alice.scalar("select bundle.create('twice')") == "twice"
        assert alice.scalar("select loose_since is not null from bundle.bundle where name = 'twice'")
        # Once it tracks a table it is a bundle of the user's, whatever arrived.
        alice.sql("select bundle.track('twice', 'public.part')")
        with pytest.raises(psycopg.errors.DuplicateObject):
            alice.sql("select bundle.create('twice')")
    finally:
        alice.sql("select bundle.drop('twice')")


def test_row_hashes_do_not_depend_on_session_settings_or_the_server(tracked):
    alice, bob = tracked
    reference = hashes(alice, "public.widget")
    assert len(reference) == 2
    odd = ("set timezone = 'America/Los_Angeles'; set datestyle = 'German, DMY'; "
           "set extra_float_digits = -3; set intervalstyle = 'sql_standard'; set bytea_output = 'escape'; "
           "set search_path = pg_catalog")
    assert hashes(alice, "public.widget", odd) == reference
    assert hashes(bob, "public.widget", odd) == reference
    assert hashes(bob, "public.part") == hashes(alice, "public.part", odd)


def test_a_new_nullable_column_changes_no_existing_hash(tracked):
    alice, _ = tracked
    before = hashes(alice, "public.widget")
    alice.sql("alter table public.widget add column color text")
    try:
        assert hashes(alice, "public.widget") == before
        alice.sql("update public.widget set color = 'red' where sku = 'w-2'")
        after = dict((k, b) for k, _h, b in hashes(alice, "public.widget"))
        assert after['["w-1"]'] == dict((k, b) for k, _h, b in before)['["w-1"]']
        assert after['["w-2"]'] != dict((k, b) for k, _h, b in before)['["w-2"]']
    finally:
        alice.sql("alter table public.widget drop column color")


def test_status_lists_what_changed_with_composite_keys(tracked):
    alice, _ = tracked
    status = alice.sql("select relation::oid::regclass::text, key::text, change from bundle.status('shop')")
    assert status == [("part", '["w-1", "1"]', "added"), ("part", '["w-1", "2"]', "added"),
                      ("widget", '["w-1"]', "added"), ("widget", '["w-2"]', "added")]


def test_writes_are_captured_by_statement_with_their_keys(tracked):
    alice, _ = tracked
    alice.sql("delete from bundle.changed_key")
    alice.sql("update public.part set n = 3 where n = 2")   # a key change: old and new key
    alice.sql("insert into public.part values ('w-2', 1, 'gear')")
    alice.sql("delete from public.part where widget = 'w-1' and n = 1")
    try:
        keys = alice.sql("select key::text from bundle.changed_key where relation = 'public.part'::regclass "
                         "order by 1")
        assert keys == [('["w-1", "1"]',), ('["w-1", "2"]',), ('["w-1", "3"]',), ('["w-2", "1"]',)]
    finally:
        alice.sql("delete from public.part; insert into public.part values ('w-1', 1, 'bolt'), ('w-1', 2, 'nut')")


def objects(cluster):
    return cluster.scalar("select count(*) from bundle.object")


def test_commit_log_and_status(tracked):
    alice, _ = tracked
    first = alice.scalar("select bundle.commit('shop', 'first widgets')")
    assert alice.sql("select * from bundle.status('shop')") == []
    log = alice.sql("select commit_id, parent_ids, message, rows_changed from bundle.log('shop')")
    assert log == [(first, [], "first widgets", 4)]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="nothing to commit"):
        alice.sql("select bundle.commit('shop', 'again')")
    before = objects(alice)
    alice.sql("update public.widget set price = 11 where sku = 'w-1'")
    assert alice.sql("select key::text, change from bundle.status('shop')") == [('["w-1"]', "modified")]
    second = alice.scalar("select bundle.commit('shop', 'dearer')")
    # one bucket (with the row in it), two fan nodes (the bucket's and the table's), one root, the commit
    assert objects(alice) - before == 5
    assert alice.sql("select commit_id, parent_ids, rows_changed from bundle.log('shop')") == [
        (second, [first], 1), (first, [], 4)]
    # Back to the first commit's rows: the same tree as the first commit.
    alice.sql("update public.widget set price = 10.50 where sku = 'w-1'")
    third = alice.scalar("select bundle.commit('shop', 'cheaper again')")
    assert alice.scalar("select tree from bundle.commit where id = %s", third) == \
        alice.scalar("select tree from bundle.commit where id = %s", first)


def test_deleting_a_bundle_deletes_its_rows_and_a_rename_is_refused(tracked):
    # The tables that take a row per object or tracked row have no foreign key (one check per
    # row was a quarter of a large commit): a trigger deletes a bundle's rows with it instead.
    alice, _ = tracked
    alice.sql("select bundle.commit('shop', 'first')")
    alice.sql("update public.widget set price = 12 where sku = 'w-1'")
    per_table = ("select (select count(*) from bundle.object where bundle = 'shop'), "
                 "(select count(*) from bundle.head_node where bundle = 'shop'), "
                 "(select count(*) from bundle.changed_key where bundle = 'shop'), "
                 "(select count(*) from bundle.commit where bundle = 'shop')")
    assert all(n > 0 for n in alice.sql(per_table)[0])
    with pytest.raises(psycopg.errors.FeatureNotSupported, match='bundle "shop" cannot be renamed'):
        alice.sql("update bundle.bundle set name = 'store' where name = 'shop'")
    alice.sql("delete from bundle.bundle where name = 'shop'")
    assert alice.sql(per_table) == [(0, 0, 0, 0)]
    alice.sql("update public.widget set price = 10.50 where sku = 'w-1'")  # nothing tracks it now
    alice.sql("select bundle.create('shop')")  # for the fixture's clean-up


def test_drop_forgets_a_bundle_and_the_capture_triggers_no_bundle_needs(tracked):
    alice, _ = tracked
    alice.sql("select bundle.commit('shop', 'first')")
    alice.sql("select bundle.create('parts'); select bundle.track('parts', 'public.part'); "
              "select bundle.commit('parts', 'first')")
    triggers = ("select c.relname, count(*) from pg_trigger t join pg_class c on c.oid = t.tgrelid "
                "where t.tgname like 'aquapeer_bundle_capture_%' group by 1 order by 1")
    assert alice.sql(triggers) == [("part", 3), ("widget", 3)]
    with pytest.raises(psycopg.errors.UndefinedObject, match='bundle "nosuch" does not exist'):
        alice.sql("select bundle.drop('nosuch')")
    # An aquapeer_admin may drop a bundle (deleting from bundle.bundle takes a superuser).
    alice.sql("drop role if exists keeper; create role keeper login in role aquapeer_admin")
    with alice.connect(user="keeper") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("delete from bundle.bundle where name = 'shop'")
        conn.execute("select bundle.drop('shop')")
    assert alice.scalar("select count(*) from bundle.bundle where name = 'shop'") == 0
    assert alice.scalar("select count(*) from bundle.object where bundle = 'shop'") == 0
    # widget is tracked by no bundle now; part still is, by parts.
    assert alice.sql(triggers) == [("part", 3)]
    assert alice.scalar("select count(*) from public.widget") == 2
    alice.sql("update public.part set kind = 'washer' where n = 2")
    assert alice.sql("select relation::text, key::text, change from bundle.status('parts')") == [
        ("part", '["w-1", "2"]', "modified")]
    alice.sql("delete from bundle.bundle where name = 'parts'")  # the same, for a superuser
    assert alice.sql(triggers) == []
    alice.sql("update public.part set kind = 'nut' where n = 2")  # as the other tests have it
    alice.sql("select bundle.create('shop')")  # for the fixture's clean-up


def test_the_same_rows_give_the_same_tree_on_two_servers(tracked):
    alice, bob = tracked
    alice.sql("select bundle.commit('shop', 'a')")
    bob.sql("select bundle.commit('shop', 'b')")
    tree = "select c.tree from bundle.commit c join bundle.bundle b on b.head = c.id where b.name = 'shop'"
    assert alice.scalar(tree) == bob.scalar(tree)


def test_tree_nodes_compare_line_by_line_even_when_lines_shift(tracked):
    # Two versions of a fan node are compared line n against line n; a child added or removed
    # shifts the lines below it, which must cost a closer look, never a wrong answer.
    alice, _ = tracked
    ids = {c: c * 64 for c in "abcde"}
    old = "aquapeer-fan/1\n00 {a}\n01 {b}\n03 {d}\n".format(**ids)
    new = "aquapeer-fan/1\n00 {a}\n02 {c}\n03 {d}\n04 {e}\n".format(**ids)
    node = {}
    for name, text in (("old", old), ("new", new)):
        node[name] = alice.scalar("insert into bundle.object select 'shop', encode(sha256(d), 'hex'), 'fan', d "
                                  "from convert_to(%s, 'UTF8') d returning id", text)
    diff = "select name, a_id, b_id from bundle._node_diff('shop', %s, %s)"
    assert set(alice.sql(diff, node["old"], node["new"])) == {
        ("01", ids["b"], None), ("02", None, ids["c"]), ("04", None, ids["e"])}
    # Receiving the new node where the checked-out tree has the old one: only the children not on
    # the same line of both need a look in the store, each with its place below.
    alice.sql("insert into bundle.head_node values ('shop', 'public.widget', '3f', %s)", node["old"])
    place = alice.scalar("select 'public.widget'::regclass::oid || ':3f'")
    assert set(alice.sql("select * from bundle._new_children('shop', 'fan', convert_to(%s, 'UTF8'), %s)",
                         new, place)) == {(ids["c"], place + "02"), (ids["e"], place + "04")}
    # Where the place is unknown, every child does.
    assert len(alice.sql("select * from bundle._new_children('shop', 'fan', convert_to(%s, 'UTF8'), null)", new)) == 4


def object_id(data):
    return hashlib.sha256(data).hexdigest()


def tree_with_fan_at(*names):
    """[blob, bucket, fan, table node, root] of a widget tree whose table node lists its one fan
    node under the given names (it fits only under "aa", where its bucket's key hashes start)."""
    blob = b'{"sku": "w-9"}'
    bucket = f"aquapeer-bucket/1\naaaa{'0' * 60} {object_id(blob)}\n".encode()
    fan = f"aquapeer-fan/1\naa {object_id(bucket)}\n".encode()
    table = ("aquapeer-fan/1\n" + "".join(f"{n} {object_id(fan)}\n" for n in names)).encode()
    return [blob, bucket, fan, table, f"aquapeer-root/1\npublic.widget {object_id(table)}\n".encode()]


def test_a_node_received_where_it_does_not_fit_is_refused(tracked):
    # The walk of a received tree goes once per place: one fan node listed under two names of a
    # table's node would have its bucket walked at two places.  A bucket fits only where its key
    # hashes hang, so the second place is refused, and nothing of the batch is kept.
    alice, _ = tracked
    objects = tree_with_fan_at("aa", "bb")
    with pytest.raises(psycopg.errors.DataCorrupted, match="does not fit its place [0-9]+:bbaa"):
        alice.sql("select count(*) from bundle._keep('shop', %s::text[], %s::bytea[])",
                  [object_id(o) for o in objects], objects)
    assert alice.sql("select (select count(*) from bundle.pending where bundle = 'shop'), "
                     "(select count(*) from bundle.object where bundle = 'shop')") == [(0, 0)]
    # Under one name it fits.
    objects = tree_with_fan_at("aa")
    alice.sql("select count(*) from bundle._keep('shop', %s::text[], %s::bytea[])",
              [object_id(o) for o in objects], objects)
    alice.sql("select bundle._promote('shop', %s::text[])", [object_id(objects[-1])])
    assert alice.scalar("select count(*) from bundle.object where bundle = 'shop'") == 5


def test_a_bucket_kept_at_one_place_is_refused_at_another(tracked):
    # A bucket received at a known place with all its blobs joins the store at once (a clone's do,
    # protocol 5), so the walk does not go into it again: a tree that lists its fan node under a
    # second name, which would put it unchecked at a second place, is refused when promoted.
    alice, _ = tracked
    blob, bucket, *nodes = tree_with_fan_at("aa", "bb")
    place = f"{alice.scalar('select %s::regclass::oid', 'public.widget')}:aaaa"
    alice.sql("select count(*) from bundle._keep('shop', %s::text[], %s::bytea[], %s::text[])",
              [object_id(blob), object_id(bucket)], [blob, bucket], [None, place])
    kind = alice.scalar("select kind from bundle.object where bundle = 'shop' and id = %s", object_id(bucket))
    assert kind == "bucket"
    alice.sql("select count(*) from bundle._keep('shop', %s::text[], %s::bytea[])",
              [object_id(o) for o in nodes], nodes)
    with pytest.raises(psycopg.errors.DataCorrupted,
                       match=r"has node [0-9a-f]{64} at two places, [0-9]+:aa(aa)? and [0-9]+:bb(aa)?"):
        alice.sql("select bundle._promote('shop', %s::text[])", [object_id(nodes[-1])])
    assert alice.scalar("select count(*) from bundle.pending where bundle = 'shop'") == 3


def test_a_clones_buckets_join_the_store_before_the_bundle_tracks_its_tables(pair):
    # A clone's caller tracks the bundle's tables in its own transaction (bundle._adopt) while
    # executors keep what arrives in theirs, where the bundle tracks nothing yet.  The places
    # below its root must still be known: a bucket at an unknown place waits among the pending
    # nodes, and bundle._promote then walks and checks every one of them at the end.
    alice, _ = pair
    alice.sql("insert into bundle.bundle (name) values ('clone')")
    try:
        blob, bucket, fan, table, root = tree_with_fan_at("aa")

        def keep(objects, places):
            return alice.sql("select id, place from bundle._keep('clone', %s::text[], %s::bytea[], %s::text[])",
                             [object_id(o) for o in objects], objects, places)

        assert keep([root], [""]) == [(object_id(table), ":")]
        assert keep([table], [":"]) == [(object_id(fan), ":aa")]
        assert keep([fan], [":aa"]) == [(object_id(bucket), ":aaaa")]
        # Without its blob the bucket waits, and the blob is asked for; with it, it joins the store.
        assert keep([bucket], [":aaaa"]) == [(object_id(blob), None)]
        assert alice.sql("select kind from bundle.pending where bundle = 'clone' and id = %s",
                         object_id(bucket)) == [("bucket",)]
        assert keep([bucket, blob], [":aaaa", None]) == []
        assert alice.sql("select kind from bundle.object where bundle = 'clone' order by 1") == [("blob",), ("bucket",)]
        alice.sql("select bundle._promote('clone', %s::text[])", [object_id(root)])
        assert alice.sql("select (select count(*) from bundle.pending where bundle = 'clone'), "
                         "(select count(*) from bundle.object where bundle = 'clone')") == [(0, 5)]
    finally:
        alice.sql("delete from bundle.bundle where name = 'clone'")


def test_a_bucket_naming_a_tree_node_received_with_it_as_a_row_is_not_complete(pair):
    # A bucket whose blobs all came with it joins the store at once.  A tree node received with
    # it is not in the store (it waits among the pending nodes), so a bucket naming one where a
    # row's blob belongs must wait too, and its "blob" be asked for.
    alice, _ = pair
    alice.sql("insert into bundle.bundle (name) values ('odd')")
    try:
        _, _, fan, _, _ = tree_with_fan_at("aa")
        bucket = f"aquapeer-bucket/1\naaaa{'0' * 60} {object_id(fan)}\n".encode()
        lacking = alice.sql("select id, place from bundle._keep('odd', %s::text[], %s::bytea[], %s::text[])",
                            [object_id(bucket), object_id(fan)], [bucket, fan], [":aaaa", None])
        assert (object_id(fan), None) in lacking
        assert alice.sql("select kind from bundle.object where bundle = 'odd'") == []
    finally:
        alice.sql("delete from bundle.bundle where name = 'odd'")


def test_two_answers_kept_side_by_side_with_the_same_blobs_do_not_deadlock(pair):
    # A pull keeps two answers side by side, and a clone's answers share blobs: the old and the
    # new bucket at a place name the same unchanged rows.  Each keep inserts in id order, so one
    # waits for the other; in the order received, each waited for the other and a pull failed.
    alice, _ = pair
    alice.sql("insert into bundle.bundle (name, loose_since) values ('side', now())")
    low, high = sorted([b'{"sku": "w-1"}', b'{"sku": "w-2"}'], key=object_id)
    keep = "select count(*) from bundle._keep('side', %s::text[], %s::bytea[])"
    outcome = {}
    try:
        with alice.connect(autocommit=False) as holder, alice.connect(autocommit=False) as other:
            holder.execute(keep, ([object_id(low)], [low]))  # uncommitted: others wait for it

            def keep_both_in_the_order_received():
                try:
                    other.execute(keep, ([object_id(high), object_id(low)], [high, low]))
                    other.commit()
                    outcome["other"] = "kept"
                except psycopg.Error as e:
                    outcome["other"] = repr(e)

            thread = threading.Thread(target=keep_both_in_the_order_received)
            thread.start()
            tb.wait_for(lambda: alice.scalar("select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
                                             other.info.backend_pid), 10)
            holder.execute(keep, ([object_id(high)], [high]))
            holder.commit()
            thread.join(30)
        assert outcome == {"other": "kept"}
        assert alice.scalar("select count(*) from bundle.object where bundle = 'side'") == 2
    finally:
        alice.sql("delete from bundle.bundle where name = 'side'")


def test_blobs_are_the_text_of_the_rows_jsonb(pair):
    """The blob is written out directly; it must stay byte for byte the jsonb text docs/bundles.md defines."""
    alice, _ = pair
    alice.sql("""
        create table public.odd ("Key" int primary key, "ß" text, a text, "quote""d" text, "longer name" jsonb,
                                 bb text[], "é" float8);
        insert into public.odd values
            (1, 'tab	and
newline', '"quoted" \\ back', 'ünï €😀', '{"z": [1, "x"], "a": null}', '{"a b",NULL,"c\\"d"}', 1e-300),
            (2, null, '', null, null, '{}', null),
            (3, E'\\u0001\\u001f ctl', 'x', 'y', '"s"', null, 'NaN')""")
    try:
        with alice.connect() as conn:
            conn.execute("set timezone = 'UTC'; set extra_float_digits = 1")
            expected = conn.execute("""
                select jsonb_strip_nulls(jsonb_build_object('Key', "Key"::text, 'ß', "ß"::text, 'a', a::text,
                    'quote"d', "quote""d"::text, 'longer name', "longer name"::text, 'bb', bb::text,
                    'é', "é"::text))::text from public.odd order by "Key" """).fetchall()
        blobs = alice.sql("select h.blob from bundle._row_hashes('public.odd', null, '{Key}', null) h "
                          "order by h.key->>0")
        assert blobs == expected
    finally:
        alice.sql("drop table public.odd")


def test_track_compares_the_whole_table_until_the_first_commit(tracked):
    alice, _ = tracked
    # A marker per table just tracked, not a key per row; rows written since are captured as ever.
    keys = "select relation::oid::regclass::text, key::text from bundle.changed_key where bundle = 'shop' order by 1, 2"
    assert alice.sql(keys) == [("part", "null"), ("widget", "null")]
    alice.sql("insert into public.part values ('w-2', 7, 'cog')")
    try:
        assert alice.sql(keys) == [("part", '["w-2", "7"]'), ("part", "null"), ("widget", "null")]
        assert len(alice.sql("select * from bundle.status('shop')")) == 5
        alice.sql("select bundle.commit('shop', 'first')")
        assert alice.sql("select * from bundle.status('shop')") == []
        assert alice.scalar("select count(*) from bundle.changed_key where bundle = 'shop'") == 0
        assert alice.scalar("select (select count(*) from bundle._head_rows('shop', 'public.widget')) "
                            "+ (select count(*) from bundle._head_rows('shop', 'public.part'))") == 5
        alice.sql("delete from public.part where n = 7")
        assert alice.sql("select key::text, change from bundle.status('shop')") == [('["w-2", "7"]', "deleted")]
    finally:
        alice.sql("delete from public.part where n = 7")


def test_a_row_received_in_a_bucket_must_be_a_key_hash_and_a_row_that_fit_its_place(tracked):
    """A bucket/2 holds its rows: each line received is a key hash and a row, under its bucket's
    path, or nothing of it is kept."""
    alice, _ = tracked
    row = '{"sku": "w-9", "name": "forged"}'
    key_hash = hashlib.sha256(b'["w-9"]').hexdigest()
    good = f"{key_hash} {row}"
    place = alice.scalar("select 'public.widget'::regclass::oid || ':' || left(%s, 4)", key_hash)
    check = "select count(*) from bundle._new_children('shop', 'bucket', convert_to(%s, 'UTF8'), %s)"
    assert alice.scalar(check, f"aquapeer-bucket/2\n{good}\n", place) == 0  # rows, no children
    assert alice.scalar(check, f"aquapeer-bucket/2\n{good}\n", None) == 0
    for bad, where in ((f"{key_hash} {hashlib.sha256(row.encode()).hexdigest()} {row}", place),
                       (f"{key_hash[:-1]}g {row}", None), (good, place[:-4] + "0000")):
        with pytest.raises(psycopg.errors.DataCorrupted, match="does not fit its place"):
            alice.scalar(check, f"aquapeer-bucket/2\n{bad}\n", where)
