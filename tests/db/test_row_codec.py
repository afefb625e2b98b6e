"""bundle._blob (src/rowcodec.c), a row's blob, held byte for byte to what it replaced: the SQL
expression bundle._rows_query wrote before, the jsonb text docs/bundles.md defines, and the
reference encoding (aquapeer.bundles.rowtext), over columns of many types and awkward names."""

import pytest
from psycopg import sql

import testbed as tb
from aquapeer.bundles import rowtext

DBNAME = "row_codec"

# (name, type) in an order unlike jsonb's; "gone" is dropped and "late" added with a default
# once rows exist (its value for them is the default, kept in the catalog, not in the rows).
COLUMNS = [
    ("id", "int primary key"), ("big", "bigint"), ("price", "numeric"), ("f4", "float4"), ("f8", "float8"),
    ("note", "text"), ("gone", "text"), ("raw", "bytea"), ("at", "timestamptz"), ("local", "timestamp"),
    ("day", "date"), ("clock", "time"), ("span", "interval"), ("ok", "boolean"), ("uid", "uuid"),
    ("doc", "jsonb"), ("js", "json"), ("nums", "int[]"), ("words", "text[]"), ("flags", "boolean[]"),
    ("pair", "public.pair"), ("mood", "public.mood"), ("host", "inet"), ("net", "cidr"), ("code", "char(6)"),
    ("letter", '"char"'), ("vc", "varchar(10)"), ("x", "xml"), ("pos", "public.positive"), ("rel", "regclass"),
    ("a very long column name, longer than the others", "text"), ("ünïcödé", "text"),
    ('quote"d \\ name', "text"), ("Z", "int"), ("é", "text"), ("twice", "int generated always as (id * 2) stored"),
]
TYPES = """
    create type public.mood as enum ('sad', 'ok', 'happy');
    create type public.pair as (label text, n int);
    create domain public.positive as int check (value > 0);
"""
ROWS = r"""
    insert into public.many (id, big, price, f4, f8, note, gone, raw, at, local, day, clock, span, ok, uid, doc, js,
                             nums, words, flags, pair, mood, host, net, code, letter, vc, x, pos, rel,
                             "a very long column name, longer than the others", "ünïcödé", "quote""d \ name",
                             "Z", "é") values
    (1, 9223372036854775807, 'NaN', '-0', '-0',
     E'say "hi" \\ back\n\ttab \u0001 \u001f \u007f \b\f\r ünï € 😀', 'x', '\x00ff10',
     '2026-11-27 10:00:00.123456+01', '2026-11-27 10:00:00', '2026-11-27', '23:59:59.5',
     '1 year 2 mons 3 days 04:05:06.7', true, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
     '{"z": [1, "x\"y"], "a": null, "é": 1.50}', '{"z": 1,  "a" : [ ] }', '{1,NULL,3}',
     array['a "q"', null, 'b\c', '', 'NULL', 'x,y'], '{t,f,NULL}', row('he said "hi"', 3), 'happy',
     '10.0.0.1', '10.0.0.0/8', 'ab', 'q', 'short', '<a b="c">d &amp; e</a>', 5, 'public.many',
     'long', 'ü', E'\\', 7, 'é'),
    (2, -1, 'Infinity', 'Infinity', '-Infinity', '', null, '\x', 'infinity', '-infinity', 'infinity', '00:00',
     '-1 day -00:00:00.000001', false, '00000000-0000-0000-0000-000000000000', '"s"', '"s"', '{}', '{}', '{}',
     row(null, null), 'sad', '::1', '::/0', 'abc   ', ' ', '', '<a/>', 1, 'pg_class', '', '', '', 0, ''),
    (3, 0, 0.00000000000000000001, 1.1, 1e-310, repeat(E'ab"\\\u0002', 30000), null, null, '1999-12-31 23:59:59+14',
     '0001-01-01 00:00:00 BC', '0001-01-01 BC', '12:00', '0', null, null, '[1, 2.50, {"b": true}]', '[1, 2.50]',
     '{{1,2},{3,4}}', '{"{}","\""}', null, row('', 0), 'ok', '192.168.1.5/24', '192.168.1.0/24', null, null,
     null, null, null, 'bundle.tracked', null, null, null, null, null),
    (4, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null,
     null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null);
    alter table public.many drop column gone;
    alter table public.many add column late text default E'later \u263a';
    insert into public.many (id, f8, late) values (5, 123456789012345680000, null), (6, 3.14, 'now');
    -- A table without a primary key, for a row with no column at all.
    create table public.blank (a int, b text);
    insert into public.blank values (null, null);
"""
ODD_SETTINGS = ("set timezone = 'America/Los_Angeles'; set datestyle = 'German, DMY'; "
                "set intervalstyle = 'sql_standard'; set extra_float_digits = -3; set bytea_output = 'escape'; "
                "set search_path = public, bundle")


def create_table(name, columns):
    return sql.SQL("create table {} ({})").format(
        sql.Identifier("public", name),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns))


@pytest.fixture(scope="module")
def db(shared_cluster):
    shared_cluster.sql(f"create database {DBNAME}")
    try:
        with shared_cluster.connect(DBNAME) as conn:
            conn.execute("create extension aquapeer cascade")
            conn.execute(TYPES)
            conn.execute(create_table("many", COLUMNS))
            conn.execute(ROWS)
        yield shared_cluster
    finally:
        shared_cluster.sql(f"drop database {DBNAME} with (force)")


def column_names(conn, relation):
    return [name for (name,) in conn.execute(
        "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 and not attisdropped "
        "order by attnum", (relation,))]


def every_way(conn, relation):
    """For each row: bundle._blob, the old expression, the jsonb text, and rowtext's blob of the
    columns read as text."""
    names = column_names(conn, relation)
    query = sql.SQL("select bundle._blob(t.*), {old}, jsonb_strip_nulls(jsonb_build_object({pairs}))::text, "
                    "array[{texts}] from only {relation} t").format(
        old=sql.SQL(tb.old_blob_expression(conn, relation)),
        pairs=sql.SQL(", ").join(sql.SQL("{}, t.{}::text").format(sql.Literal(n), sql.Identifier(n)) for n in names),
        texts=sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(n)) for n in names),
        relation=sql.SQL(relation))
    return [(blob, old, jsonb, rowtext.blob(dict(zip(names, texts, strict=True))))
            for blob, old, jsonb, texts in conn.execute(query)]


def row_hashes(conn, relation):
    return conn.execute("select h.key::text, h.blob, h.blob_id from bundle._row_hashes(%s, null, '{id}', null) h "
                        "order by h.key->>0", (relation,)).fetchall()


def test_every_row_blob_is_the_old_expression_the_jsonb_text_and_the_reference(db):
    with db.connect(DBNAME) as conn:
        tb.use_row_hash_settings(conn)
        rows = every_way(conn, "public.many")
        assert len(rows) == 6
        for blob, old, jsonb, reference in rows:
            assert blob == old == jsonb == reference
        # What the ways agree on: a cast to text that is not the output function, a column added
        # with a default after the row, the regclass qualified, a generated column, the dropped
        # column and NULLs left out.
        first = rows[0][0]
        assert '"ok": "true"' in first and '"host": "10.0.0.1/32"' in first and '"code": "ab"' in first
        assert '"late": "later ☺"' in first and '"rel": "public.many"' in first and '"twice": "2"' in first
        assert '"gone"' not in first
        assert rows[3][0] == '{"id": "4", "late": "later ☺", "twice": "8"}'
        assert every_way(conn, "public.blank") == [("{}",) * 4]
        # An anonymous record names its columns f1, f2, ...
        assert conn.execute("select bundle._blob(row(1, null, 'x'))").fetchone()[0] == '{"f1": "1", "f3": "x"}'


def test_row_hashes_do_not_depend_on_session_settings(db):
    with db.connect(DBNAME) as conn:
        reference = row_hashes(conn, "public.many")
        conn.execute(ODD_SETTINGS)
        assert row_hashes(conn, "public.many") == reference
        tb.use_row_hash_settings(conn)
        assert [blob for _, blob, _ in reference] == [blob for blob, *_ in every_way(conn, "public.many")]


def test_a_table_listing_its_columns_in_another_order_has_the_same_blobs(db):
    columns = [c for c in COLUMNS if c[0] != "gone"] + [("late", "text")]
    written = [sql.Identifier(c) for c, t in columns if "generated" not in t]
    with db.connect(DBNAME) as conn:
        conn.execute(create_table("many_reordered", columns[::-1]))
        try:
            conn.execute(sql.SQL("insert into public.many_reordered ({columns}) select {columns} from public.many")
                         .format(columns=sql.SQL(", ").join(written)))
            assert row_hashes(conn, "public.many_reordered") == row_hashes(conn, "public.many")
        finally:
            conn.execute("drop table public.many_reordered")


def test_a_column_named_t_does_not_stand_for_the_row(db):
    # bundle._rows_query passes the row as "t.*": a bare "t" would name this column.
    with db.connect(DBNAME) as conn:
        conn.execute("create table public.tee (id int primary key, t text)")
        try:
            conn.execute("insert into public.tee values (1, 'x')")
            assert row_hashes(conn, "public.tee")[0][1] == '{"t": "x", "id": "1"}'
        finally:
            conn.execute("drop table public.tee")


FIXED_SETTINGS = {"TimeZone=UTC", "DateStyle=ISO, YMD", "IntervalStyle=iso_8601", "extra_float_digits=1",
                  "bytea_output=hex", "lc_monetary=C"}


def test_every_function_that_hashes_or_decodes_rows_fixes_all_the_settings_of_the_format(db):
    """docs/bundles.md, "A column's text": a function that fixes some of them (it hashes rows or
    reads them back) must fix all of them, or a row's text would depend on the session there."""
    with db.connect(DBNAME) as conn:
        functions = conn.execute(
            "select p.oid::regprocedure::text, p.proconfig from pg_proc p "
            "where p.pronamespace = 'bundle'::regnamespace and 'extra_float_digits=1' = any (p.proconfig)").fetchall()
    assert len(functions) >= 6
    for name, config in functions:
        assert FIXED_SETTINGS <= set(config), f"{name} fixes {config}"
