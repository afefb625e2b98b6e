"""Bundles leaving and entering a database: bundle.export and bundle.import, `aquapeer export`
and `aquapeer import` between two real clusters, bundle._adopt's compatibility check, and the
garbage collection of objects no commit references."""

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path

import psycopg
import pytest

import testbed as tb

MODULE_TESTBED = {"n": 2, "names": ["alice", "bob"]}
CLI = Path(os.environ.get("AQUAPEER_BINDIR") or "/usr/local/bin") / "aquapeer"

TABLES = """
    create table public.widget (sku text primary key, name text, price numeric, made timestamptz,
                                tags text[], photo bytea);
    create table public.part (widget text, n int, kind text, primary key (widget, n));
"""
ALICES_ROWS = """
    insert into public.widget values
        ('w-1', 'widget', 10.50, '2026-11-27 10:00:00+01', '{a,b}', '\\x00ff'),
        ('w-2', 'gadget', null, null, null, null),
        ('w-3', 'gizmo', 3, null, '{}', null);
    insert into public.part values ('w-1', 1, 'bolt'), ('w-1', 2, 'nut');
"""


@pytest.fixture(scope="module")
def pair(module_testbed):
    """alice with a bundle "shop" of two commits; bob with the same tables (and a column and a row
    of his own), no bundle."""
    alice, bob = module_testbed.alice, module_testbed.bob
    for cluster in (alice, bob):
        cluster.sql("create extension aquapeer cascade")
        cluster.sql(TABLES)
        cluster.sql("create role clerk login in role aquapeer_admin")
    bob.sql("alter table public.widget add column color text; "
            "insert into public.widget (sku, name, color) values ('b-1', 'bob''s own', 'red')")
    alice.sql(ALICES_ROWS)
    alice.sql("select bundle.create('shop'); select bundle.track('shop', 'public.widget'); "
              "select bundle.track('shop', 'public.part')")
    alice.sql("select bundle.commit('shop', 'first')")
    alice.sql("update public.widget set price = 11 where sku = 'w-1'; delete from public.widget where sku = 'w-3'; "
              "insert into public.part values ('w-2', 1, 'gear')")
    alice.sql("select bundle.commit('shop', 'second')")
    return alice, bob


@pytest.fixture(autouse=True)
def bob_without_the_bundle(pair):
    _, bob = pair
    bob.sql("delete from bundle.bundle where name = 'shop'")
    yield
    bob.sql("delete from bundle.bundle where name = 'shop'")


def export(cluster, name="shop"):
    return [d for (d,) in cluster.sql("select bundle.export(%s)", name)]


def write_lines(path, documents):
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))


def cli(*args):
    assert CLI.is_file(), f"{CLI} missing: install first"
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=60)


def head(cluster, name="shop"):
    return cluster.scalar("select head from bundle.bundle where name = %s", name)


def store(cluster):
    """What the bundle's stores hold: counts of objects, pending nodes and commits, and the head."""
    return cluster.sql("select (select count(*) from bundle.object where bundle = 'shop'), "
                       "(select count(*) from bundle.pending where bundle = 'shop'), "
                       "(select count(*) from bundle.commit where bundle = 'shop'), "
                       "(select head from bundle.bundle where name = 'shop')")[0]


def log(cluster):
    return cluster.sql("select * from bundle.log('shop')")


def object_ids(cluster):
    return cluster.sql("select id, kind from bundle.object where bundle = 'shop' order by id")


def tree_objects(cluster, commits="select b.head from bundle.bundle b where b.name = 'shop'"):
    """(id, kind, text) of the objects below the trees of the given commits of bundle shop."""
    return cluster.sql(f"""
        with recursive walk(id) as (
            select c.tree from bundle.commit c where c.bundle = 'shop' and c.id in ({commits})
            union
            select ch.child from walk w join bundle.object o on o.bundle = 'shop' and o.id = w.id and o.kind <> 'blob'
            cross join lateral bundle._children(o.data) ch(child)
        )
        select o.id, o.kind, convert_from(o.data, 'UTF8') from walk w
        join bundle.object o on o.bundle = 'shop' and o.id = w.id order by 1""")


def history_objects(cluster):
    """(id, kind) of the commits of bundle shop and everything their trees reach."""
    return sorted([(i, k) for i, k, _t in tree_objects(cluster, "select id from bundle.commit")]
                  + cluster.sql("select id, kind from bundle.object where bundle = 'shop' and kind = 'commit'"))


def head_blobs(cluster):
    """The rows of the bundle's head commit, as its buckets hold them (bucket/2: each line's text
    after the key hash) or their blobs (bucket/1)."""
    return sorted([text for _id, kind, text in tree_objects(cluster) if kind == "blob"]
                  + [line[65:] for _id, kind, text in tree_objects(cluster)
                     if text.startswith("aquapeer-bucket/2\n") for line in text.split("\n")[1:] if line])


def test_export_is_a_header_then_objects_children_first_then_commits_parents_first(pair, tmp_path):
    alice, _ = pair
    documents = export(alice)
    header, rest = documents[0], documents[1:]
    assert header == {"type": "bundle", "format": "aquapeer-bundle/2", "name": "shop", "head": head(alice),
                      "tables": alice.scalar("select bundle._describe('shop')")}
    assert [t["relation"] for t in header["tables"]] == ["public.part", "public.widget"]
    assert header["tables"][0]["key_columns"] == ["widget", "n"]
    assert header["tables"][1]["columns"][2] == ["price", "numeric"]

    objects = [d for d in rest if d["type"] == "object"]
    commits = [d for d in rest if d["type"] == "commit"]
    assert rest == objects + commits
    seen = set()
    for d in objects:
        data = base64.b64decode(d["data"], validate=True)
        assert hashlib.sha256(data).hexdigest() == d["id"]
        if data.startswith((b"aquapeer-fan/", b"aquapeer-root/")):  # its children came before it
            children = {line[-64:] for line in data.decode().split("\n")[1:] if line}
            assert children <= seen, f"{d['id']} came before its children"
        seen.add(d["id"])
    # Every object of the history, each once; the commits parents first, as signed.
    assert len(seen) == len(objects)
    assert sorted(seen) == [i for i, _k, _t in tree_objects(alice, "select id from bundle.commit")]
    signed = dict(alice.sql("select id, document from bundle.commit where bundle = 'shop'"))
    assert commits == [signed[c] for c, *_ in reversed(log(alice))]
    with pytest.raises(psycopg.errors.UndefinedObject, match='bundle "nope" does not exist'):
        export(alice, "nope")
    out = cli("export", "--dbname", alice.dsn, "nope", tmp_path / "nope.jsonl")
    assert out.returncode == 1 and out.stdout == "" and not (tmp_path / "nope.jsonl").exists()
    assert 'aquapeer export: bundle "nope" does not exist' in out.stderr and "Traceback" not in out.stderr


def test_a_bundle_moves_through_a_file_and_importing_twice_changes_nothing(pair, tmp_path):
    alice, bob = pair
    path = tmp_path / "shop.jsonl"
    # As a member of aquapeer_admin, not a superuser.
    out = cli("export", "--dbname", alice.dsn + " user=clerk", "shop", path)
    assert out.returncode == 0, out.stderr
    assert "exported bundle shop:" in out.stdout and "2 commits" in out.stdout
    assert [json.loads(line) for line in path.read_text().splitlines()] == export(alice)
    bobs_rows = bob.sql("select * from public.widget order by sku")

    out = cli("import", "--dbname", bob.dsn + " user=clerk", path)
    assert out.returncode == 0, out.stderr
    assert "imported bundle shop:" in out.stdout and "already here" in out.stdout
    assert log(bob) == log(alice)
    assert object_ids(bob) == history_objects(alice)
    assert head(bob) == head(alice)
    assert bob.scalar("select checked_out from bundle.bundle where name = 'shop'") is None
    assert bob.sql("select relation::text from bundle.tracked where bundle = 'shop' order by 1") == [
        ("part",), ("widget",)]
    # The head's rows are alice's rows; bob's tables wait for bundle.checkout.
    source = sorted(r for (r,) in alice.sql(
        "select r.blob from bundle.tracked t, bundle._row_hashes(t.relation, t.filter, t.key_columns, null) r "
        "where t.bundle = 'shop'"))
    assert len(source) == 5 and head_blobs(bob) == source
    assert bob.sql("select * from public.widget order by sku") == bobs_rows

    # Again, from standard output to standard input.
    before = store(bob)
    out = subprocess.run(f"{CLI} export --dbname '{alice.dsn}' shop | {CLI} import --dbname '{bob.dsn}' -",
                         shell=True, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(0 documents new," in out.stdout and "exported bundle shop:" in out.stderr
    assert store(bob) == before and log(bob) == log(alice)


def import_batch(cluster, documents):
    """(type, outcome) of each document, from bundle.import_batch on a fresh connection."""
    with cluster.connect() as conn:
        return conn.execute("select type, outcome from bundle.import_batch(%s::jsonb[])",
                            [[json.dumps(d) for d in documents]]).fetchall()


def test_import_batch_answers_as_import_one_document_at_a_time(pair):
    alice, bob = pair
    documents = export(alice)
    objects = [d for d in documents if d["type"] == "object"]
    assert len(objects) > 3 and documents[1] == objects[0]
    batch = documents[:3] + [objects[0]] + documents[3:]  # an object twice in one run of objects
    expected = [(d["type"], "new") for d in batch]
    expected[3] = ("object", "known")
    assert import_batch(bob, batch) == expected
    assert log(bob) == log(alice) and head(bob) == head(alice)
    assert object_ids(bob) == history_objects(alice)

    assert import_batch(bob, documents) == [(d["type"], "known") for d in documents]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="came before the bundle's header"):
        import_batch(bob, objects)


def test_an_existing_bundle_keeps_its_head(pair, tmp_path):
    alice, bob = pair
    bob.sql("select bundle.create('shop'); select bundle.track('shop', 'public.widget'); "
            "select bundle.track('shop', 'public.part')")
    own = bob.scalar("select bundle.commit('shop', 'bob''s')")
    path = tmp_path / "shop.jsonl"
    write_lines(path, export(alice))
    out = cli("import", "--dbname", bob.dsn, path)
    assert out.returncode == 0, out.stderr
    assert f'NOTICE: bundle "shop" exists here: its head stays at {own}' in out.stderr
    assert head(bob) == own
    assert {c for c, *_ in log(alice)} <= {c for (c,) in bob.sql("select id from bundle.commit")}


def test_a_tampered_object_is_refused_and_nothing_is_kept(pair, tmp_path):
    alice, bob = pair
    documents = export(alice)
    blob = next(d for d in documents if d["type"] == "object"
                and base64.b64decode(d["data"]).startswith(b"aquapeer-bucket/2\n"))
    blob["data"] = base64.b64encode(base64.b64decode(blob["data"]).replace(b"w-", b"x-")).decode()
    path = tmp_path / "tampered.jsonl"
    write_lines(path, documents)
    out = cli("import", "--dbname", bob.dsn, path)
    assert out.returncode == 1
    assert f"object {blob['id']} does not match its content" in out.stderr
    assert "nothing was imported" in out.stderr and "Traceback" not in out.stderr
    assert bob.scalar("select count(*) from bundle.bundle where name = 'shop'") == 0

    # One document at a time: the header is kept, the tampered object is not.
    with bob.connect() as conn:
        conn.execute("select bundle.import(%s)", [json.dumps(documents[0])])
        with pytest.raises(psycopg.errors.DataCorrupted, match="does not match its content"):
            conn.execute("select bundle.import(%s)", [json.dumps(blob)])
    assert store(bob) == (0, 0, 0, None)


def test_a_commit_with_a_bad_signature_is_refused(pair):
    alice, bob = pair
    documents = export(alice)
    first = next(d for d in documents if d["type"] == "commit")
    signature = bytearray(base64.b64decode(first["signature"]))
    signature[0] ^= 1
    forged = dict(first, signature=base64.b64encode(bytes(signature)).decode())
    with bob.connect() as conn:
        imported = [conn.execute("select bundle.import(%s)", [json.dumps(d)]).fetchone()[0]
                    for d in documents if d["type"] != "commit"]
        assert set(imported) == {"new"}
        before = store(bob)
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=f"signature of commit {first['id']} does not verify"):
            conn.execute("select bundle.import(%s)", [json.dumps(forged)])
        # Nothing of it: no commit, and its tree is still only pending.
        assert store(bob) == before and before[1] > 0 and before[2] == 0
        # The genuine commits are taken, and the new bundle gets the exported head.
        for d in documents:
            if d["type"] == "commit":
                assert conn.execute("select bundle.import(%s)", [json.dumps(d)]).fetchone()[0] == "new"
    assert head(bob) == head(alice) and log(bob) == log(alice)
    assert store(bob)[1] == 0


def test_a_commit_whose_tree_or_parents_are_missing_is_refused(pair):
    alice, bob = pair
    documents = export(alice)
    header = documents[0]
    objects = [d for d in documents if d["type"] == "object"]
    first, second = [d for d in documents if d["type"] == "commit"]
    with bob.connect() as conn:
        conn.execute("select bundle.import(%s)", [json.dumps(header)])
        with pytest.raises(psycopg.errors.DataCorrupted,
                           match=f"commit {first['id']} of bundle \"shop\" refers to objects the import did not bring"):
            conn.execute("select bundle.import(%s)", [json.dumps(first)])
        for d in objects:
            conn.execute("select bundle.import(%s)", [json.dumps(d)])
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=f"commit {second['id']} has parents this database lacks: {first['id']}"):
            conn.execute("select bundle.import(%s)", [json.dumps(second)])
    assert store(bob)[2:] == (0, None)


def test_what_is_not_a_bundle_export_is_refused(pair, tmp_path):
    alice, bob = pair
    header, first_object = export(alice)[:2]
    with bob.connect() as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="came before the bundle's header"):
            conn.execute("select bundle.import(%s)", [json.dumps(first_object)])
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not the header of a bundle export") as refused:
            conn.execute("select bundle.import(%s)", [json.dumps(dict(header, format="aquapeer-bundle/3"))])
        assert "newer aquapeer" in refused.value.diag.message_hint
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(header) + "\n" + json.dumps(first_object) + "\n{not json\n")
    out = cli("import", "--dbname", bob.dsn, path)
    assert out.returncode == 1 and "invalid input syntax for type json" in out.stderr
    assert "(in lines 1-3); nothing was imported" in out.stderr
    assert bob.scalar("select count(*) from bundle.bundle where name = 'shop'") == 0


def test_adopt_lists_every_difference_at_once(pair):
    _, bob = pair
    bob.sql("create schema other; "
            "create table other.widget (sku text, name int, stock int not null default 0, made date, "
            "primary key (sku, name)); "
            "create table other.fine (id int primary key, v text, extra text, since date default now(), "
                "twice int generated always as (id * 2) stored)")
    try:
        description = json.dumps([
            {"relation": "other.fine", "key_columns": ["id"], "columns": [["id", "integer"], ["v", "text"]]},
            {"relation": "other.gone", "key_columns": ["id"], "columns": [["id", "integer"]]},
            {"relation": "other.widget", "key_columns": ["sku"],
             "columns": [["sku", "text"], ["name", "text"], ["price", "numeric"], ["made", "date"]]}])
        with pytest.raises(psycopg.errors.DatatypeMismatch) as refused:
            bob.sql("select bundle._adopt('other', %s)", description)
        message = refused.value.diag.message_primary
        assert message == ('the tables here do not match bundle "other": other.gone: no such table here; '
                           'other.widget: primary key (sku) there, (sku, name) here; '
                           'other.widget.name: text there, integer here; '
                           'other.widget.price: numeric there, missing here; '
                           'other.widget.stock: not there, and not null here')
        assert "same primary key" in refused.value.diag.message_hint
        assert bob.scalar("select count(*) from bundle.bundle where name = 'other'") == 0
        # Extra columns that are nullable or generated are fine (a checkout writes them NULL).
        bob.sql("select bundle._adopt('other', %s)", json.dumps(json.loads(description)[:1]))
        assert bob.sql("select relation::text from bundle.tracked where bundle = 'other'") == [("other.fine",)]
    finally:
        bob.sql("delete from bundle.bundle where name = 'other'; drop schema other cascade")


def test_garbage_collection_removes_what_no_commit_reaches(pair):
    alice, _ = pair
    history, reached = log(alice), history_objects(alice)
    blob = b'{"sku": "w-9"}'
    blob_id = hashlib.sha256(blob).hexdigest()
    bucket = f"aquapeer-bucket/1\n{'0' * 64} {blob_id}\n".encode()
    bucket_id = hashlib.sha256(bucket).hexdigest()
    # A pull that broke off: a blob and a bucket above it, but never the commit.
    alice.sql("select bundle._keep('shop', %s, %s)", [blob_id, bucket_id], [blob, bucket])
    loose = {"blob": blob_id, "bucket": bucket_id}
    assert alice.sql("select id, 'blob' from bundle.object where id = %(blob)s union all "
                     "select id, kind from bundle.pending where id = %(bucket)s", loose) == [
        (blob_id, "blob"), (bucket_id, "bucket")]
    try:
        # Younger than the retention: nothing is collected.
        assert alice.sql("select * from bundle._collect_garbage()") == []
        alice.sql("update peer.config set object_retention = '1 s'")
        tb.wait_for(lambda: alice.scalar("select now() - loose_since > '1 s' from bundle.bundle "
                                         "where name = 'shop'"), 5)
        # Not while a transaction is promoting a tree of the bundle (it may need those objects).
        with alice.connect() as busy:
            with busy.transaction():
                busy.execute("select bundle._promote('shop', '{}')")
                assert alice.sql("select * from bundle._collect_garbage()") == []
        assert alice.scalar("select count(*) from bundle.pending where bundle = 'shop'") == 1
        # The worker's retention runs when it starts, then every 5 minutes.
        alice.sql("select peer.stop_worker()")
        alice.sql("select peer.start_worker()")
        tb.wait_for(lambda: alice.scalar("select count(*) from bundle.pending where bundle = 'shop'") == 0, 20,
                    message="retention to drop the pending bucket")
        assert object_ids(alice) == reached
        assert log(alice) == history
        assert alice.scalar("select loose_since from bundle.bundle where name = 'shop'") is None
    finally:
        alice.sql("update peer.config set object_retention = default")
