"""ALTER EXTENSION aquapeer UPDATE from the previous release, for real.

The previous release is built and installed from its recorded commit
(releases.txt) in a git worktree, a cluster gets the extension at that version
with data in every table, then this tree is installed over it, the server
restarts (the library is preloaded and compiled for one payload), and the
update runs.  Nothing may be lost, the worker must come back on the new code,
and the upgraded schema must be the schema a fresh install makes.  Whatever
happens, this tree's version is installed again at the end.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))
import build_sql  # noqa: E402

import testbed as tb  # noqa: E402

VERSION = build_sql.control_version()
DATA_DB = "upgraded"
FRESH_DB = "fresh"


def make_install(tree: Path) -> None:
    proc = subprocess.run(["make", "-s", "install"], cwd=tree, env=tb.outside_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"make install in {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# The last release whose bundles were of object format 1: an update from it crosses the format
# boundary (docs/bundles.md, "Format 1 and the upgrade"), whatever release came before this one.
FORMAT_1_RELEASE = "0.16.0"


@pytest.fixture(params=sorted({build_sql.previous_release(VERSION)[0], FORMAT_1_RELEASE}))
def previous_release_installed(request, tmp_path):
    version, commit = request.param, dict(build_sql.releases())[request.param]
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True)
    assert known.returncode == 0, (
        f"release {version}'s commit {commit} is not in this clone: fetch the history (git fetch --unshallow)")
    worktree = tmp_path / f"aquapeer-{version}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), commit],
                   check=True, capture_output=True)
    try:
        make_install(worktree)
        yield version
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                       capture_output=True)
        make_install(REPO)


# Data in every table of the previous release, through its API where it has one.
FILL = """
update peer.config set executor_pool_size = 3, outbox_retention = '2 days';
insert into peer.signal_server (url) values ('ws://127.0.0.1:9');
insert into peer.stun_server (url) values ('stun:127.0.0.1:9');
insert into peer.turn_server (url, username, credential) values ('turn:127.0.0.1:9', 'u', 'secret');
select peer.add_friend('bob', %(invite)s);
insert into peer.friend_request (peer_id, claimed_name, chain) values ('stranger-id', 'carol', '\\x00');
select peer.allow_topic('greetings', 'bob');
select peer.on_message('greetings', 'app.on_greeting(peer.inbox)'::regprocedure);
select peer.expose('app.echo(jsonb)'::regprocedure, 'bob', 'echo');
select peer.send('bob', 'greetings', '{"n": 1}');
select peer.send('bob', 'greetings', '{"n": 2}');
insert into peer.inbox_stream (peer_id, epoch, hwm) values ('bob-id', gen_random_uuid(), 1);
insert into peer.inbox (id, friend, topic, payload, sent_at)
    values (gen_random_uuid(), 'bob', 'greetings', '{}', now());
insert into peer.stream_epoch (epoch, system_identifier, timeline, database_oid)
    values (gen_random_uuid(), 1, 1, 1) on conflict do nothing;
insert into peer.outbox_stream (peer_id, epoch, last_seq) select peer_id, gen_random_uuid(), 0 from peer.friend;
select bundle.create('widgets');
select bundle.track('widgets', 'app.widget');
select bundle.commit('widgets', 'first');
update app.widget set name = name || '!' where id <= 2;
select bundle.commit('widgets', 'second');
update app.widget set name = 'changed' where id = 3;
select peer.share_bundle('widgets', 'bob', true);
insert into bundle.pending (bundle, id, kind, data) values ('widgets', repeat('ab', 32), 'fan', '\\x00');
insert into peer.transfer (id, friend, bundle, direction) values (gen_random_uuid(), 'bob', 'widgets', 'pull');
insert into bundle.merge (bundle, theirs, ours) values ('widgets', repeat('cd', 32), repeat('ef', 32));
insert into bundle.conflicts (bundle, relation, key, column_name, ours, theirs)
    values ('widgets', 'app.widget', '["1"]', 'name', 'a', 'b');
"""
# And in the tables a release added, when the previous release has them.
FILL_SINCE = {
    "0.20.0": """
select peer.publish('app.widget', 'bob');
select peer.subscribe('app.widget', 'bob', initial => false);
update app.widget set name = 'live' where id = 3;  -- stamped: a table friends also write to
update app.widget set name = 'changed' where id = 3;
insert into peer.apply_errors (relation, friend, key, change, sqlstate, reason)
    values ('app.widget', 'bob', '{"id": 9}', '{"op": "I", "k": {"id": 9}}', '23505', 'duplicate key');
insert into peer.replication_conflicts (relation, key, "column", local_value, local_clock, local_origin,
                                        remote_value, remote_clock, remote_origin, winner)
    values ('app.widget', '{"id": 3}', 'name', '"a"', 1, 'me', '"b"', 2, 'bob-id', 'remote');
select peer.follow_bundle('bob', 'widgets');
""",
    "0.21.0": """
update peer.config set copy_chunk_rows = 500, change_retention = '3 days';
update peer.subscription set state = 'initializing', copy_kind = 'resync', copy_id = gen_random_uuid(),
    copy_after = '{"id": 7}', copy_rows = 7, copy_chunks = 1, copy_started_at = now()
    where relation = 'app.widget'::regclass;
insert into peer.change_ahead_of_copy (relation, friend, key, change)
    values ('app.widget', 'bob', '{"id": 20}', '{"op": "U", "k": {"id": 20}, "v": {"name": "early"}}');
insert into peer.resync_key (relation, friend, key) values ('app.widget', 'bob', '{"id": 21}');
""",
    "0.22.0": """
update peer.config set status = 'in a meeting', soft_lock_ttl = '45 s';
select peer.watch('app.widget', 'bob');
insert into peer.friend_presence (friend, status, status_at, last_connected) values ('bob', 'away', now(), now());
insert into peer.soft_lock (id, holder, relation, key, ttl)
    values (gen_random_uuid(), 'bob', 'app.widget', '["4"]', '30 s');
insert into peer.live_share (id, relation, key, friend, asked_here, ttl)
    values ('00000000-0000-0000-0000-000000000022', 'app.widget', '["5"]', 'bob', true, '10 min');
insert into peer.live_text (share, "column", value, state)
    values ('00000000-0000-0000-0000-000000000022', 'name', 'widget 5', '\\x00');
insert into peer.live_replication (relation, friend, made_subscription) values ('app.widget', 'bob', false);
""",
}


def fill_statements(previous: str) -> list[str]:
    def release(version):
        return tuple(int(n) for n in version.split("."))
    scripts = [FILL] + [fill for since, fill in FILL_SINCE.items() if release(previous) >= release(since)]
    return [statement for script in scripts for statement in filter(str.strip, script.split(";\n"))]

APP = """
create schema app;
create table app.widget (id integer primary key, name text not null);
insert into app.widget select i, 'widget ' || i from generate_series(1, 50) i;
create function app.on_greeting(m peer.inbox) returns void language sql as 'select null';
create function app.echo(arg jsonb) returns jsonb language sql as 'select arg';
"""

# Every table of the extension: what must survive.
TABLES = """
select c.oid::regclass::text from pg_class c
join pg_depend d on d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e'
join pg_extension e on e.oid = d.refobjid and e.extname = 'aquapeer'
where c.relkind = 'r' and c.relname <> 'migration'
order by 1
"""

# The extension's schema as the catalog holds it, one line an item, in a stable order.
CATALOG = r"""
with members as (
    select d.classid, d.objid from pg_depend d
    join pg_extension e on e.oid = d.refobjid and e.extname = 'aquapeer'
    where d.deptype = 'e'
)
select 'function ' || p.oid::regprocedure || E'\n' || pg_get_functiondef(p.oid)
       || E'\nconfig ' || coalesce(array_to_string(p.proconfig, ','), '')
       || E'\nacl ' || coalesce((select string_agg(case when a.grantee = 0 then 'public'
                                                        else a.grantee::regrole::text end
                                                   || '=' || a.privilege_type, ',' order by 1)
                                 from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                                 where a.grantee <> p.proowner), '')
       || E'\ncomment ' || coalesce(obj_description(p.oid, 'pg_proc'), '')
from members m join pg_proc p on m.classid = 'pg_proc'::regclass and p.oid = m.objid
union all
select 'relation ' || c.oid::regclass || ' ' || c.relkind::text
       || E'\nacl ' || coalesce((select string_agg(case when a.grantee = 0 then 'public'
                                                        else a.grantee::regrole::text end
                                                   || '=' || a.privilege_type, ',' order by 1)
                                 from aclexplode(c.relacl) a where a.grantee <> c.relowner), '')
       || E'\ncomment ' || coalesce(obj_description(c.oid, 'pg_class'), '')
       || E'\noptions ' || coalesce(array_to_string(c.reloptions, ','), '')
       || coalesce(E'\nview ' || pg_get_viewdef(c.oid), '')
       || coalesce((select string_agg(E'\ncolumn ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                      || case when a.attnotnull then ' not null' else '' end
                                      || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')
                                      || coalesce(' collate ' || nullif(co.collname, 'default'), '')
                                      || coalesce(' compression ' || nullif(a.attcompression::text, ''), '')
                                      || coalesce(' identity ' || nullif(a.attidentity::text, ''), '')
                                      || coalesce(' acl ' || a.attacl::text, '')
                                      || coalesce(' comment ' || col_description(c.oid, a.attnum), ''),
                                      '' order by a.attnum)
                   from pg_attribute a
                   left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum
                   left join pg_collation co on co.oid = a.attcollation
                   where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '')
       || coalesce((select string_agg(E'\nconstraint ' || x.conname || ' ' || pg_get_constraintdef(x.oid), ''
                                      order by x.conname)
                    from pg_constraint x where x.conrelid = c.oid), '')
       || coalesce((select string_agg(E'\nindex ' || pg_get_indexdef(i.indexrelid), '' order by 1)
                    from pg_index i where i.indrelid = c.oid), '')
       || coalesce((select string_agg(E'\ntrigger ' || pg_get_triggerdef(t.oid), '' order by t.tgname)
                    from pg_trigger t where t.tgrelid = c.oid and not t.tgisinternal), '')
       || case when c.relkind = 'S' then coalesce((select E'\nowned by ' || d.refobjid::regclass || '.' || d.refobjsubid
                                                   from pg_depend d where d.classid = 'pg_class'::regclass
                                                   and d.objid = c.oid and d.deptype in ('a', 'i')), '') else '' end
from members m join pg_class c on m.classid = 'pg_class'::regclass and c.oid = m.objid
union all
select 'schema ' || n.nspname || ' acl ' || coalesce(n.nspacl::text, '')
from pg_namespace n where n.nspname in ('peer', 'bundle')
union all
select 'dumped with pg_dump: ' || coalesce((select string_agg(r::regclass::text, ', ' order by r::regclass::text)
                                           from unnest(e.extconfig) r), '')
from pg_extension e where e.extname = 'aquapeer'
order by 1
"""


def dump_schema(cluster, dbname: str) -> list[str]:
    """pg_dump --schema-only of the extension's objects (binary-upgrade mode lists them one by one), less
    what differs between any two databases: oids, xids, sequence values, the dump's own random key,
    user objects."""
    out = subprocess.run(
        ["runuser", "-u", tb.server_user()[0], "--", os.path.join(tb.pg_bindir(), "pg_dump"),
         "-h", cluster.sock_dir, "-p", str(cluster.port), "-U", "postgres",
         "--schema-only", "--binary-upgrade", "--exclude-schema=app", dbname],
        capture_output=True, text=True, timeout=120, cwd="/", check=True).stdout
    noise = re.compile(r"binary_upgrade_|relfrozenxid|pg_catalog.setval|^WHERE oid = |^\\(un)?restrict |^--|^$")
    return [line for line in out.splitlines() if not noise.search(line)]


def table_columns(cluster, dbname: str) -> dict[str, list[str]]:
    """Each table's columns, in order."""
    return {table: [c for (c,) in cluster.sql(
                "select quote_ident(attname) from pg_attribute where attrelid = %s::regclass and attnum > 0 "
                "and not attisdropped order by attnum", table, dbname=dbname)]
            for (table,) in cluster.sql(TABLES, dbname=dbname)}


def table_contents(cluster, dbname: str, columns: dict[str, list[str]] | None = None) -> dict[str, tuple]:
    """Each table's row count and the md5 of its rows in order: of the given columns of the given
    tables (those a release had: a later one may add columns and tables), else of all.  Rows the
    extension inserts itself (the handlers of its own topics, and its topics every friend may use) are
    left out."""
    columns = columns or table_columns(cluster, dbname)
    own = {"peer.message_handler": "where topic not like 'aquapeer.%%'",
           "peer.topic_grant": "where topic not like 'aquapeer.%%' or friend is not null"}
    return {table: cluster.sql(f"select count(*), md5(string_agg(t::text, '|' order by t::text)) "
                               f"from (select {', '.join(cols)} from {table} {own.get(table, '')}) t",
                               dbname=dbname)[0]
            for table, cols in columns.items()}


def catalog(cluster, dbname: str) -> list[str]:
    return [row[0] for row in cluster.sql(CATALOG, dbname=dbname)]


def assert_same(upgraded: list[str], fresh: list[str], what: str) -> None:
    diff = list(difflib.unified_diff(fresh, upgraded, "fresh install", "upgraded", lineterm="", n=1))
    assert not diff, f"{what} of the upgraded database differs from a fresh install:\n" + "\n".join(diff[:80])


@pytest.mark.timeout(1500)
def test_update_from_the_previous_release_loses_nothing_and_matches_a_fresh_install(
        previous_release_installed, make_testbed):
    previous = previous_release_installed
    cluster = make_testbed(1, names=["upgrade"], extra_conf={"aquapeer.restart_interval": 1})[0]

    # The previous release: its worker runs in postgres; the data lives in a database without one.
    cluster.sql("create extension aquapeer cascade")
    assert cluster.scalar("select extversion from pg_extension where extname = 'aquapeer'") == previous
    tb.wait_for(lambda: cluster.scalar("select (peer.worker_status()).aquapeer_version") == previous, 30)
    invite = cluster.scalar("select peer.invite()")
    cluster.sql(f'create database "{DATA_DB}"')
    cluster.sql("create extension aquapeer cascade", dbname=DATA_DB)
    cluster.sql(APP, dbname=DATA_DB)
    for statement in fill_statements(previous):
        if "%(invite)s" in statement:
            cluster.sql(statement, {"invite": invite}, dbname=DATA_DB)
        else:
            cluster.sql(statement, dbname=DATA_DB)
    columns_before = table_columns(cluster, DATA_DB)
    before = table_contents(cluster, DATA_DB, columns_before)
    formats_before = [f for (f,) in cluster.sql(
        "select c.document->'commit'->>'format' from bundle.commit c where c.bundle = 'widgets' "
        "order by c.committed_at", dbname=DATA_DB)]
    assert formats_before == ["aquapeer-bundle/1" if previous == FORMAT_1_RELEASE else "aquapeer-bundle/2"] * 2
    empty = sorted(name for name, (rows, _) in before.items() if rows == 0)
    assert not empty, f"the test leaves these tables empty: {empty}"

    # This tree over it; the preloaded library only changes with a restart.
    make_install(REPO)
    cluster.restart()
    with pytest.raises(psycopg.Error, match="ALTER EXTENSION aquapeer UPDATE"):
        cluster.sql("select peer.ping_worker()", dbname=DATA_DB)

    for db in ("postgres", DATA_DB):
        cluster.sql("alter extension aquapeer update", dbname=db)
        assert cluster.scalar("select extversion from pg_extension where extname = 'aquapeer'", dbname=db) == VERSION

    # The worker comes back on the new code, and what was there is all still there.
    tb.wait_for(lambda: _worker_version(cluster) == VERSION, 30,
                message=f"the worker to come back on {VERSION}")
    assert cluster.scalar("select peer.version()", dbname=DATA_DB) == VERSION
    # an upgrade is no restore: the worker stays online as the same peer
    assert cluster.scalar("select count(*) from peer.identity_restored", dbname=DATA_DB) == 0
    # (bundle.head_row goes with object format 2: the head's buckets hold its rows; peer.outbox_commit
    # with 0.20.0, whose senders commit without a stamp.)
    kept = {t: c for t, c in columns_before.items() if t in table_columns(cluster, DATA_DB)}
    assert set(columns_before) - set(kept) <= {"bundle.head_row", "peer.outbox_commit"}
    assert table_contents(cluster, DATA_DB, kept) == {t: v for t, v in before.items() if t in kept}
    # The run-once steps the previous release had ran then; those it lacked ran in this update.
    commit = dict(build_sql.releases())[previous]
    had = {Path(p).stem for p in subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", commit, "sql/incremental/"],
        capture_output=True, text=True, check=True).stdout.split()}
    assert cluster.sql("select name, applied_in from peer.migration order by name", dbname=DATA_DB) == [
        (step.stem, previous if step.stem in had else VERSION) for step in build_sql.incremental_steps()]
    assert cluster.scalar("select count(*) from bundle.log('widgets')", dbname=DATA_DB) == 2
    assert ("app.widget", ["3"]) in cluster.sql("select relation::text, key from bundle.status('widgets')",
                                               dbname=DATA_DB)
    cluster.sql("delete from bundle.merge", dbname=DATA_DB)
    cluster.sql("select bundle.commit('widgets', 'third, after the update')", dbname=DATA_DB)
    _history_crosses_the_format_boundary(cluster, formats_before)

    # The schema an upgrade leaves is the schema a fresh install makes.
    cluster.sql(f'create database "{FRESH_DB}"')
    cluster.sql("create extension aquapeer cascade", dbname=FRESH_DB)
    cluster.sql(APP, dbname=FRESH_DB)  # pg_dump orders by dependencies, which user objects add to
    assert_same(catalog(cluster, DATA_DB), catalog(cluster, FRESH_DB), "the catalog")
    assert_same(dump_schema(cluster, DATA_DB), dump_schema(cluster, FRESH_DB), "pg_dump --schema-only")


def _history_crosses_the_format_boundary(cluster, formats_before):
    """The two commits made before the update keep their format (aquapeer-bundle/1 from 0.16.0)
    and their ids; the one after is this version's; diff, checkout and an export carry the whole
    history across."""
    def sql(query, *args, dbname=DATA_DB):
        return cluster.sql(query, *args, dbname=dbname)
    log = sql("select l.commit_id, c.document->'commit'->>'format' from bundle.log('widgets') l "
              "join bundle.commit c on c.bundle = 'widgets' and c.id = l.commit_id order by l.committed_at")
    assert [f for _, f in log] == [*formats_before, "aquapeer-bundle/2"]
    (first, _), (second, _), (third, _) = log
    assert sql("select key::text, old, new from bundle.diff('widgets', %s, %s) order by 1", first, third) == [
        ('["1"]', "widget 1", "widget 1!"), ('["2"]', "widget 2", "widget 2!"), ('["3"]', "widget 3", "changed")]
    assert sql("select key::text from bundle.diff('widgets', %s, %s)", second, third) == [('["3"]',)]
    rows = "select id, name from app.widget order by id"
    now = sql(rows)
    sql("select bundle.checkout('widgets', %s)", first)
    assert sql(rows) == [(i, f"widget {i}") for i in range(1, 51)]
    sql("select bundle.checkout('widgets')")
    assert sql(rows) == now and sql("select * from bundle.status('widgets')") == []
    sql("update app.widget set name = 'fourth' where id in (1, 4)")
    sql("select bundle.commit('widgets', 'fourth: a bucket of format 1 rewritten')")
    assert sql("select count(*) from bundle.log('widgets')") == [(4,)]
    # The whole history through an export, into a database that never had format 1.
    sql("create database moved")
    sql("create extension aquapeer cascade", dbname="moved")
    sql(APP.split("insert into")[0], dbname="moved")
    with cluster.connect(dbname="moved") as conn:
        conn.execute("select bundle.import_batch(%s::jsonb[])",
                     [[d for (d,) in sql("select bundle.export('widgets')::text")]])
        conn.execute("select bundle.checkout('widgets')")
        assert conn.execute(rows).fetchall() == sql(rows)
        assert conn.execute("select commit_id from bundle.log('widgets')").fetchall() == sql(
            "select commit_id from bundle.log('widgets')")


def _worker_version(cluster):
    try:
        return cluster.scalar("select (peer.worker_status()).aquapeer_version")
    except psycopg.Error:
        return None
