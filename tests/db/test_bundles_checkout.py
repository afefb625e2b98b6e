"""Bundles on a real cluster: checkout (foreign-key order, cycles, sequences, refusal and force,
triggers, constraints), rescan and diff, and plans that stay linear when the store or a table
was emptied and vacuumed."""

import psycopg
import pytest

MODULE_TESTBED = {"n": 1, "names": ["alice"]}


@pytest.fixture(scope="module")
def alice(module_testbed):
    alice = module_testbed.alice
    alice.sql("create extension aquapeer cascade")
    alice.sql("create role clerk login in role aquapeer_admin")
    return alice


@pytest.fixture
def db(alice):
    """A fresh schema s and bundle b for each test."""
    alice.sql("create schema s")
    alice.sql("select bundle.create('b')")
    yield alice
    alice.sql("delete from bundle.bundle where name = 'b'; drop schema s cascade")


def track(cluster, *tables):
    for table in tables:
        cluster.sql("select bundle.track('b', %s::regclass)", table)


def commit(cluster, message="m"):
    return cluster.scalar("select bundle.commit('b', %s)", message)


def rows(cluster, table, order="1"):
    return cluster.sql(f"select * from {table} order by {order}")


def status(cluster):
    return cluster.sql("select relation::text, key::text, change from bundle.status('b')")


def notices_of(cluster, query, *params, user=None, settings=""):
    """(rows, notices) of a query run on a fresh connection, after the settings."""
    notices = []
    with cluster.connect(**({"user": user} if user else {})) as conn:
        if settings:
            conn.execute(settings)
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        result = conn.execute(query, params or None).fetchall()
    return result, notices


def test_checkout_of_an_older_commit_and_back(db):
    db.sql("create table s.item (id int primary key, name text, price numeric, tags text[], meta jsonb, "
           "made timestamptz, gone interval)")
    db.sql("insert into s.item values (1, 'one', 1.5, '{a,\"b c\"}', '{\"k\": [1, 2]}', '2026-11-27 10:00+01', "
           "'1 day'), (2, 'two', null, null, null, null, null), (3, 'three', 3, '{}', '\"x\"', null, null)")
    track(db, "s.item")
    first = commit(db, "first")
    at_first = rows(db, "s.item")
    db.sql("update s.item set name = 'ONE', meta = '[]' where id = 1; delete from s.item where id = 2; "
           "insert into s.item (id, name) values (4, 'four')")
    second = commit(db, "second")
    at_second = rows(db, "s.item")
    assert at_second != at_first

    # As a non-superuser, under odd session settings.
    result, notices = notices_of(db, "select bundle.checkout('b', %s)", first, user="clerk",
                                 settings="set timezone = 'Asia/Tokyo'; set datestyle = 'German, DMY'; "
                                          "set intervalstyle = 'sql_standard'; set extra_float_digits = -3")
    assert result == [(first,)]
    assert rows(db, "s.item") == at_first
    assert any(f"now hold commit {first}, not its head {second}" in n for n in notices)
    assert status(db) == []
    assert db.sql("select head, checked_out from bundle.bundle where name = 'b'") == [(second, first)]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not from its head"):
        db.sql("update s.item set name = 'x' where id = 3; select bundle.commit('b', 'lost')")
    db.sql("update s.item set name = 'three' where id = 3")

    assert db.scalar("select bundle.checkout('b')") == second
    assert rows(db, "s.item") == at_second
    assert status(db) == []
    # Reading the head's tree gives the head rows.
    assert db.sql("select r.relation_name, r.key_hash, r.b_blob from bundle._tree_diff('b', null, "
                  "(select tree from bundle.commit where id = %s)) r order by 2", second) == \
        db.sql("select 's.item', key_hash, row_hash from bundle._head_rows('b', 's.item') order by 2")
    # The head rows are the head's again: a new commit changes one row against it.
    db.sql("update s.item set price = 9 where id = 4")
    third = commit(db)
    assert db.sql("select parent_ids, rows_changed from bundle.log('b') where commit_id = %s", third) == [([second], 1)]


def test_foreign_key_order_inserts_parents_first_and_deletes_children_first(db):
    # Named so that alphabetical order would be the wrong order.
    db.sql("create table s.z_parent (id int primary key, name text)")
    db.sql("create table s.a_child (id int primary key, parent int not null references s.z_parent)")
    db.sql("insert into s.z_parent values (1, 'old'); insert into s.a_child values (10, 1)")
    track(db, "s.a_child", "s.z_parent")
    first = commit(db)
    # Reparent the child to a new parent, delete the old parent, add a child.
    db.sql("insert into s.z_parent values (2, 'new'); update s.a_child set parent = 2; "
           "delete from s.z_parent where id = 1; insert into s.a_child values (11, 2)")
    second = commit(db)
    db.sql("select bundle.checkout('b', %s)", first)
    assert rows(db, "s.z_parent") == [(1, "old")]
    assert rows(db, "s.a_child") == [(10, 1)]
    db.sql("select bundle.checkout('b', %s)", second)
    assert rows(db, "s.z_parent") == [(2, "new")]
    assert rows(db, "s.a_child") == [(10, 2), (11, 2)]
    # Everything deleted, then back.
    db.sql("delete from s.a_child; delete from s.z_parent")
    empty = commit(db)
    db.sql("select bundle.checkout('b', %s)", first)
    assert rows(db, "s.a_child") == [(10, 1)]
    db.sql("select bundle.checkout('b', %s)", empty)
    assert rows(db, "s.z_parent") == [] and rows(db, "s.a_child") == []


def test_a_tree_of_rows_in_a_self_referencing_table(db):
    db.sql("create table s.node (id int primary key, parent int references s.node, name text)")
    # Parents have higher ids than their children, so neither key order works alone.
    db.sql("insert into s.node values (5, null, 'root'), (4, 5, 'a'), (3, 4, 'b'), (2, 4, 'c'), (1, 3, 'd')")
    track(db, "s.node")
    full = commit(db)
    db.sql("delete from s.node where id < 5")
    db.sql("update s.node set name = 'alone'")
    bare = commit(db)
    db.sql("select bundle.checkout('b', %s)", full)
    assert rows(db, "s.node") == [(1, 3, "d"), (2, 4, "c"), (3, 4, "b"), (4, 5, "a"), (5, None, "root")]
    db.sql("select bundle.checkout('b', %s)", bare)
    assert rows(db, "s.node") == [(5, None, "alone")]


def test_a_row_moves_under_a_row_inserted_with_it_and_gives_it_a_unique_value(db):
    # The rows a table has are updated and the others inserted in one statement: foreign keys are
    # checked at its end, and a unique value an updated row gives up goes to an inserted row.
    db.sql("create table s.folder (id int primary key, parent int references s.folder, slug text unique)")
    db.sql("insert into s.folder values (1, null, 'root'), (3, 1, 'archive'), (2, 3, 'docs-old'), (4, 1, 'docs')")
    track(db, "s.folder")
    moved = commit(db)
    db.sql("delete from s.folder where id = 4; update s.folder set parent = 1, slug = 'docs' where id = 2; "
           "delete from s.folder where id = 3")
    commit(db)
    db.sql("select bundle.checkout('b', %s)", moved)
    assert rows(db, "s.folder") == [(1, None, "root"), (2, 3, "docs-old"), (3, 1, "archive"), (4, 1, "docs")]
    assert status(db) == []


def test_a_cycle_through_deferrable_constraints_is_checked_out(db):
    db.sql("create table s.a (id int primary key, b int not null)")
    db.sql("create table s.b (id int primary key, a int not null references s.a deferrable)")
    db.sql("alter table s.a add foreign key (b) references s.b deferrable")
    db.sql("begin; set constraints all deferred; insert into s.a values (1, 1); insert into s.b values (1, 1); commit")
    track(db, "s.a", "s.b")
    both = commit(db)
    db.sql("begin; set constraints all deferred; delete from s.a; delete from s.b; commit")
    none = commit(db)
    db.sql("select bundle.checkout('b', %s)", both)
    assert rows(db, "s.a") == [(1, 1)] and rows(db, "s.b") == [(1, 1)]
    # The constraints are immediate again after the checkout.
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.sql("begin; insert into s.a values (2, 2); commit")
    db.sql("select bundle.checkout('b', %s)", none)
    assert rows(db, "s.a") == [] and rows(db, "s.b") == []


def test_tables_of_key_columns_only_or_with_a_deferrable_key_are_checked_out(db):
    # A checkout updates the rows whose keys are there and inserts the others ("on conflict"
    # could not take a deferrable key as its arbiter); a table of key columns only is never
    # updated.
    db.sql("create table s.pair (a int, b text, primary key (a, b))")
    db.sql("create table s.slot (id int primary key deferrable, label text)")
    db.sql("insert into s.pair values (1, 'x'), (2, 'y'); insert into s.slot values (1, 'one'), (2, 'two')")
    track(db, "s.pair", "s.slot")
    first = commit(db)
    db.sql("delete from s.pair where a = 1; insert into s.pair values (3, 'z')")
    db.sql("update s.slot set label = 'uno' where id = 1; delete from s.slot where id = 2; "
           "insert into s.slot values (3, 'three')")
    second = commit(db)
    db.sql("select bundle.checkout('b', %s)", first)
    assert rows(db, "s.pair") == [(1, "x"), (2, "y")]
    assert rows(db, "s.slot") == [(1, "one"), (2, "two")]
    assert status(db) == []
    db.sql("select bundle.checkout('b', %s)", second)
    assert rows(db, "s.pair") == [(2, "y"), (3, "z")]
    assert rows(db, "s.slot") == [(1, "uno"), (3, "three")]
    assert status(db) == []


def test_a_cycle_through_a_non_deferrable_constraint_is_an_error_naming_it(db):
    db.sql("create table s.a (id int primary key, b int)")
    db.sql("create table s.b (id int primary key, a int references s.a)")
    db.sql("alter table s.a add constraint a_needs_b foreign key (b) references s.b")
    db.sql("insert into s.a values (1, null); insert into s.b values (1, 1); update s.a set b = 1")
    track(db, "s.a", "s.b")
    both = commit(db)
    db.sql("update s.a set b = null; delete from s.b; delete from s.a")
    commit(db)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match=r"foreign key (a_needs_b on s\.a|b_a_fkey on s\.b) is part of a cycle") as e:
        db.sql("select bundle.checkout('b', %s)", both)
    assert "DEFERRABLE" in e.value.diag.message_hint
    assert rows(db, "s.a") == [] and rows(db, "s.b") == []


def test_sequences_move_past_the_rows_checked_out_and_never_back(db):
    db.sql("create table s.t (id serial primary key, n bigint generated by default as identity unique, v text)")
    db.sql("insert into s.t values (100, 200, 'x'), (101, 201, 'y')")  # the sequences are not used
    track(db, "s.t")
    full = commit(db)
    db.sql("delete from s.t")
    empty = commit(db)
    db.sql("select setval('s.t_id_seq', 5)")
    db.sql("select bundle.checkout('b', %s)", full)
    assert db.sql("insert into s.t (v) values ('z') returning id, n") == [(102, 202)]
    db.sql("delete from s.t where v = 'z'")
    db.sql("select bundle.checkout('b', %s)", empty)
    db.sql("select setval('s.t_id_seq', 500)")
    db.sql("select bundle.checkout('b', %s)", full)
    assert db.scalar("select nextval('s.t_id_seq')") == 501


def test_uncommitted_changes_are_refused_unless_forced(db):
    db.sql("create table s.t (k1 text, k2 int, v text, primary key (k1, k2))")
    db.sql("insert into s.t values ('a', 1, 'x'), ('a', 2, 'y')")
    track(db, "s.t")
    first = commit(db)
    db.sql("update s.t set v = 'z' where k2 = 2")
    second = commit(db)
    db.sql("update s.t set v = 'mine' where k2 = 1; insert into s.t values ('b', 1, 'new')")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="2 uncommitted change") as e:
        db.sql("select bundle.checkout('b', %s)", first)
    assert "force => true" in e.value.diag.message_hint
    assert rows(db, "s.t") == [("a", 1, "mine"), ("a", 2, "z"), ("b", 1, "new")]
    db.sql("select bundle.checkout('b', %s, force => true)", first)
    assert rows(db, "s.t") == [("a", 1, "x"), ("a", 2, "y")]
    assert status(db) == []
    db.sql("update s.t set v = 'again' where k2 = 1")
    db.sql("select bundle.checkout('b', force => true)")  # the head, over the change
    assert rows(db, "s.t") == [("a", 1, "x"), ("a", 2, "z")]
    assert db.scalar("select checked_out from bundle.bundle where name = 'b'") == second
    assert status(db) == []


def test_a_checkout_is_a_change_to_another_bundle_tracking_the_same_table(db):
    db.sql("create table s.t (id int primary key, v text)")
    db.sql("insert into s.t values (1, 'a'), (2, 'b')")
    track(db, "s.t")
    first = commit(db)
    db.sql("select bundle.create('other'); select bundle.track('other', 's.t'); select bundle.commit('other', 'o')")
    try:
        db.sql("update s.t set v = 'c' where id = 2")
        commit(db)
        db.sql("select bundle.commit('other', 'o2')")
        db.sql("select bundle.checkout('b', %s)", first)
        assert status(db) == []
        assert db.sql("select relation::text, key::text, change from bundle.status('other')") == \
            [("s.t", '["2"]', "modified")]
    finally:
        db.sql("delete from bundle.bundle where name = 'other'")


def test_a_user_trigger_that_changes_rows_during_checkout_shows_in_status(db):
    db.sql("create table s.t (id int primary key, v text, note text)")
    db.sql("insert into s.t values (1, 'a', null), (2, 'b', null)")
    track(db, "s.t")
    first = commit(db)
    db.sql("update s.t set v = 'c' where id = 1")
    commit(db)
    db.sql("create function s.touch() returns trigger language plpgsql as $$ "
           "begin new.note := 'touched'; return new; end $$")
    db.sql("create trigger touch before insert or update on s.t for each row execute function s.touch()")
    db.sql("select bundle.checkout('b', %s)", first)
    assert rows(db, "s.t") == [(1, "a", "touched"), (2, "b", None)]
    assert status(db) == [("s.t", "[\"1\"]", "modified")]


def test_a_row_violating_a_local_constraint_changes_nothing(db):
    db.sql("create table s.t (id int primary key, price numeric)")
    db.sql("insert into s.t values (1, 5), (2, 50)")
    track(db, "s.t")
    first = commit(db)
    db.sql("update s.t set price = 60 where id = 1; update s.t set price = 70 where id = 2")
    second = commit(db)
    db.sql("alter table s.t add constraint dear check (price > 10) not valid")
    before = db.sql("select key_hash, row_hash from bundle._head_rows('b', 's.t') order by 1")
    with pytest.raises(psycopg.errors.CheckViolation, match=f"cannot check out commit {first}.*dear") as e:
        db.sql("select bundle.checkout('b', %s)", first)
    assert "nothing was changed" in e.value.diag.message_hint
    assert rows(db, "s.t") == [(1, 60), (2, 70)]
    assert db.sql("select key_hash, row_hash from bundle._head_rows('b', 's.t') order by 1") == before
    assert db.scalar("select checked_out from bundle.bundle where name = 'b'") == second
    assert status(db) == []


def test_rescan_finds_writes_that_bypassed_the_triggers(db):
    db.sql("create table s.t (id int primary key, v text)")
    db.sql("insert into s.t values (1, 'a'), (2, 'b'), (3, 'c')")
    track(db, "s.t")
    commit(db)
    db.sql("set session_replication_role = replica; update s.t set v = 'B' where id = 2; "
           "delete from s.t where id = 3; insert into s.t values (4, 'd')")
    assert status(db) == []
    assert db.scalar("select bundle.rescan('b')") == 3
    assert status(db) == [("s.t", '["2"]', "modified"), ("s.t", '["3"]', "deleted"), ("s.t", '["4"]', "added")]
    assert db.scalar("select bundle.rescan('b')") == 0  # already recorded


def test_diff_lists_the_fields_that_changed(db):
    db.sql("create table s.t (k1 text, k2 int, v text, w int, primary key (k1, k2))")
    db.sql("insert into s.t values ('a', 1, 'x', 1), ('a', 2, 'y', null)")
    track(db, "s.t")
    first = commit(db)
    db.sql("update s.t set v = 'X', w = null where k2 = 1; delete from s.t where k2 = 2; "
           "insert into s.t values ('b', 1, null, 7)")
    second = commit(db)
    diff = "select relation::text, key::text, column_name, old, new from bundle.diff('b', %s, %s)"
    assert db.sql(diff, first, second) == [
        ("s.t", '["a", "1"]', "v", "x", "X"),
        ("s.t", '["a", "1"]', "w", "1", None),
        ("s.t", '["a", "2"]', "k1", "a", None),
        ("s.t", '["a", "2"]', "k2", "2", None),
        ("s.t", '["a", "2"]', "v", "y", None),
        ("s.t", '["b", "1"]', "k1", None, "b"),
        ("s.t", '["b", "1"]', "k2", None, "1"),
        ("s.t", '["b", "1"]', "w", None, "7"),
    ]
    assert db.sql(diff, second, second) == []
    # From nothing: every field of the first commit; to the head by default.
    assert len(db.sql("select * from bundle.diff('b', null, %s)", first)) == 7
    assert db.sql("select count(*) from bundle.diff('b', %s)", first) == [(8,)]
    with pytest.raises(psycopg.errors.UndefinedObject, match="has no commit"):
        db.sql("select * from bundle.diff('b', %s, %s)", first, "0" * 64)


def sequential_scans(cluster, *tables):
    """Sequential scans of each table so far, as the statistics say once flushed."""
    with cluster.connect() as conn:
        conn.execute("set stats_fetch_consistency = none")
        return [conn.execute("select seq_scan from pg_stat_all_tables where relid = %s::regclass",
                             (t,)).fetchone()[0] for t in tables]


def test_a_clone_into_an_emptied_and_vacuumed_table_does_not_scan_it_per_row(db):
    """A table and bundle.head_node emptied and vacuumed look empty to the planner.  The checkout
    probed both for each row it wrote; a nested loop over a scan of a table that looks empty
    then read the table whole per row, rows the same statement had written (71 s for 100,000
    rows).  The scans are counted, since a plan cannot be seen from here."""
    db.sql("create table s.item (id int primary key, name text)")
    db.sql("insert into s.item select g, 'item ' || g from generate_series(1, 2000) g")
    track(db, "s.item")
    head = commit(db)
    documents = [d for (d,) in db.sql("select bundle.export('b')")]
    db.sql("delete from bundle.bundle where name = 'b'")
    db.sql("truncate s.item")
    db.sql("vacuum s.item")
    db.sql("vacuum bundle.head_node")
    assert db.scalar("select relpages from pg_class where oid = 'bundle.head_node'::regclass") == 0
    with db.connect() as conn:
        for d in documents:
            conn.execute("select bundle.import(%s)", (psycopg.types.json.Jsonb(d),))
    db.sql("select pg_stat_force_next_flush()")
    before = sequential_scans(db, "s.item", "bundle.head_node")
    with db.connect() as conn:
        assert conn.execute("select bundle.checkout('b')").fetchone()[0] == head
        conn.execute("select pg_stat_force_next_flush()")
    after = sequential_scans(db, "s.item", "bundle.head_node")
    scans = dict(zip(("s.item", "bundle.head_node"), (a - b for a, b in zip(after, before, strict=True)), strict=True))
    assert all(n < 50 for n in scans.values()), scans
    assert db.scalar("select count(*) from s.item") == 2000
    assert status(db) == []


def test_keeping_objects_in_an_emptied_and_vacuumed_store_looks_them_up_by_key(db):
    """bundle.object emptied and vacuumed looks empty to the planner, and a session that made
    its plans then (an executor keeping what a pull receives lives long) scanned the store whole
    for each object it kept: a clone of a million rows took minutes instead of seconds.  Here an
    import in one session: it keeps each object through bundle._keep, once to make its plans
    and once more after the store was emptied."""
    db.sql("create table s.item (id int primary key, name text)")
    db.sql("insert into s.item select g, 'item ' || g from generate_series(1, 300) g")
    track(db, "s.item")
    commit(db)
    documents = [d for (d,) in db.sql("select bundle.export('b')")]
    db.sql("delete from bundle.bundle where name = 'b'")
    with db.connect() as conn:
        def import_all():
            for d in documents:
                conn.execute("select bundle.import(%s)", (psycopg.types.json.Jsonb(d),))
            conn.execute("delete from bundle.bundle where name = 'b'")
        import_all()
        db.sql("vacuum bundle.object, bundle.pending")
        assert db.scalar("select relpages from pg_class where oid = 'bundle.object'::regclass") == 0
        conn.execute("select pg_stat_force_next_flush()")
        before = sequential_scans(db, "bundle.object")[0]
        import_all()
        conn.execute("select pg_stat_force_next_flush()")
        scans = sequential_scans(db, "bundle.object")[0] - before
    assert len(documents) > 400
    assert scans < 20, f"{scans} sequential scans of bundle.object keeping {len(documents)} documents"


def buffers_used(conn, query):
    """The buffers a statement read or found in the cache, shared and local, with all the statements
    the functions it calls ran (EXPLAIN ANALYZE counts them at the top)."""
    plan = conn.execute(f"explain (analyze, buffers, format json) {query}").fetchone()[0][0]["Plan"]
    return sum(plan[f"{scope} {kind} Blocks"] for scope in ("Shared", "Local") for kind in ("Hit", "Read"))


def test_a_clone_and_the_commit_after_it_do_not_plan_from_statistics_taken_before_the_data(db):
    """Statistics of the store taken while it held another, small bundle (autovacuum takes them
    a minute after any checkout) say the new bundle has no nodes and no objects.  Joins planned
    from them read every node of the new bundle per node gone at checkout (49 s for a clone of
    20,000 rows), and every object of the bundle per blob of the commit after it (8.6 s for
    1,000 rows); planned right, they take well under a second.  What is counted is the buffers
    each statement used, nested statements included: about 0.4 million and 65,000 planned right."""
    # Both bundles are made in a database of their own: this store never held the big one.
    source = "stale_source"
    db.sql(f"create database {source}")
    try:
        db.sql("create extension aquapeer cascade; create schema s", dbname=source)
        exports = {}
        for name, rows in (("small", 10), ("big", 20000)):
            for database in (source, "postgres"):
                db.sql(f"create table s.{name} (id int primary key, v text)", dbname=database)
            db.sql(f"insert into s.{name} select g, 'row ' || g from generate_series(1, {rows}) g", dbname=source)
            db.sql("select bundle.create(%s)", name, dbname=source)
            db.sql("select bundle.track(%s, %s::regclass)", name, f"s.{name}", dbname=source)
            db.sql("select bundle.commit(%s, 'all of it')", name, dbname=source)
            exports[name] = [psycopg.types.json.Jsonb(d)
                             for (d,) in db.sql("select bundle.export(%s)", name, dbname=source)]
    finally:
        db.sql(f"drop database {source} with (force)")
    try:
        db.sql("select bundle.import_batch(%s)", exports["small"])
        db.sql("select bundle.checkout('small')")
        db.sql("analyze bundle.head_node, bundle.object, bundle.pending, bundle.changed_key")
        db.sql("select bundle.import_batch(%s)", exports["big"])
        with db.connect() as conn:
            checkout = buffers_used(conn, "select bundle.checkout('big')")
            conn.execute("update s.big set v = v || '!' where id % 20 = 0")
            commit_ = buffers_used(conn, "select bundle.commit('big', 'a thousand rows changed')")
        # Planned from the statistics: 18.5 million and 19.9 million.
        assert checkout < 2_000_000, f"the clone's checkout used {checkout:,} buffers: planned from stale statistics"
        assert commit_ < 1_000_000, f"the commit after it used {commit_:,} buffers: planned from stale statistics"
        assert db.scalar("select count(*) from s.big") == 20000
        assert db.scalar("select count(*) from bundle.log('big')") == 2
        assert db.sql("select * from bundle.status('big')") == []
    finally:
        db.sql("delete from bundle.bundle where name in ('small', 'big')")


def test_a_checkout_of_a_few_rows_finds_their_head_nodes_by_key(db):
    """A checkout moves the head tree's nodes along the paths it changes.  Joined by the planner's
    estimates, a few changes went through all the head rows of the bundle (0.2 s for 1,000 rows of
    200,000, whatever few changed).  Each node is found by its key, so head_node is never scanned."""
    db.sql("create table s.t (id int primary key, v text)")
    db.sql("insert into s.t select g, 'row ' || g from generate_series(1, 50000) g")
    track(db, "s.t")
    first = commit(db, "all")
    before = rows(db, "s.t")
    db.sql("update s.t set v = v || '!' where id % 500 = 0")
    db.sql("delete from s.t where id <= 10")
    db.sql("insert into s.t select g, 'new ' || g from generate_series(50001, 50010) g")
    second = commit(db, "a few")
    db.sql("analyze bundle.head_node")
    for target, expected in ((first, before), (second, rows(db, "s.t"))):
        with db.connect() as conn:
            conn.execute("select pg_stat_force_next_flush()")
            scans = sequential_scans(db, "bundle.head_node")[0]
            conn.execute("select bundle.checkout('b', %s)", (target,))
            conn.execute("select pg_stat_force_next_flush()")
        assert sequential_scans(db, "bundle.head_node")[0] == scans
        assert rows(db, "s.t") == expected
        assert db.sql("select * from bundle.status('b')") == []
    assert db.scalar("select count(*) from bundle._head_rows('b', 's.t')") == 50000


def test_a_commit_does_not_plan_from_statistics_taken_before_its_rows(db):
    """The store's statistics taken while it held another table's rows say a new table of the
    bundle has one head node.  Joins planned from them went through every head row of the new
    table once per bucket the commit rebuilt: a first commit of 10,000 rows took 8.6 s instead of
    0.2, and each later commit as long.  What is counted is the buffers each commit used, nested
    statements included."""
    db.sql("create table s.before (id int primary key, v text)")
    db.sql("insert into s.before select g, 'row ' || g from generate_series(1, 20000) g")
    track(db, "s.before")
    commit(db, "the table before")
    db.sql("analyze bundle.head_node, bundle.object")
    db.sql("select bundle.drop('b'); drop table s.before")
    db.sql("select bundle.create('b')")
    db.sql("create table s.after (id int primary key, v text)")
    db.sql("insert into s.after select g, 'row ' || g from generate_series(1, 10000) g")
    track(db, "s.after")
    with db.connect() as conn:
        first = buffers_used(conn, "select bundle.commit('b', 'all of it')")
        conn.execute("update s.after set v = v || '!' where id % 10 = 0")
        later = buffers_used(conn, "select bundle.commit('b', 'a thousand rows changed')")
    assert first < 1_000_000, f"the first commit used {first:,} buffers: planned from stale statistics"
    # Planned from the statistics: 1.9 million for the later commit; about 0.32 million and
    # 76,000 planned right.
    assert later < 300_000, f"the commit after it used {later:,} buffers: planned from stale statistics"
    assert db.sql("select * from bundle.status('b')") == []
    assert db.scalar("select count(*) from bundle.log('b')") == 2


def test_a_commit_of_one_row_reads_as_few_tree_nodes_in_a_large_bundle_as_in_a_small_one(db):
    """A commit rewrites the path its rows hang on: a bucket, two fan nodes, the root.  The table's
    node was read from the range of head_node's paths that holds every node of the table, and
    the empty buckets and fan nodes were filtered out of all the table's nodes rather than probed:
    a one-row commit read 2,239 nodes in a bundle of 2,000 rows and 30,249 in one of 40,000 (and
    took 20 ms more per million rows).  Counted: head_node's rows fetched through its index."""
    fetched = {}
    for rows in (2000, 40000):
        db.sql(f"create table s.t{rows} (id int primary key, v text)")
        db.sql(f"insert into s.t{rows} select g, 'row ' || g from generate_series(1, {rows}) g")
        db.sql(f"select bundle.create('b{rows}'); select bundle.track('b{rows}', 's.t{rows}')")
        db.sql(f"select bundle.commit('b{rows}', 'all')")
        with db.connect() as conn:
            conn.execute(f"update s.t{rows} set v = 'changed' where id = 7")
            conn.execute("set stats_fetch_consistency = none")
            count = "select idx_tup_fetch from pg_stat_all_tables where relid = 'bundle.head_node'::regclass"
            conn.execute("select pg_stat_force_next_flush()")
            before = conn.execute(count).fetchone()[0]
            conn.execute(f"select bundle.commit('b{rows}', 'one row')")
            conn.execute("select pg_stat_force_next_flush()")
            fetched[rows] = conn.execute(count).fetchone()[0] - before
    try:
        assert fetched[40000] < 1000 and fetched[2000] < 1000, fetched
    finally:
        db.sql("delete from bundle.bundle where name in ('b2000', 'b40000')")
