"""Benchmark committing bundles against PostgreSQL writing and dumping the same table.

Run with `make bench` (or `.venv/bin/python bench/bundles.py --rows 200000` for a
quick run).  One real cluster (the test bed's settings), a table

    widget(id int primary key, name text, price numeric, tags text[], meta jsonb, updated timestamptz)

of --rows rows with realistic values (about 200 MB for 1,000,000), and in the
same run, side by side:

- native references: `CREATE TABLE copy AS SELECT * FROM widget` plus its
  primary key (writing the same data once), and `pg_dump -t widget` to
  /dev/null (the test bed's pg_dump);
- aquapeer: bundle.track, the first bundle.commit of the whole table (target:
  at most 3 times CTAS plus primary key), bundle.status after one changed row,
  a commit of that one row (target: under 1 s, and a handful of storage rows:
  rows of bundle.object, head_row and head_node counted before and after), a
  commit of --changed rows spread over the table, and the size of the bundle
  schema's tables against the table's.

With --rounds N everything runs N times (a fresh bundle each round) and the
table shows each figure's best round (noise on a shared machine only adds
time); --json prints every round's figures as one line of JSON.

Adding parts: each part is a function part(bed, args, figures) in PARTS,
run in order on the same test bed; a part that fails is reported and the next
one still runs.  The pull parts (peer.pull_bundle into an empty second
cluster against `pg_dump -t widget | psql` between the same two clusters, and
--changed rows committed and pulled incrementally end to end) belong after
"aquapeer": bed.add('bob'), create_widget_table(bob), tb.join_signaling and
tb.befriend as in bench/messaging.py, bundle.share_bundle; change_rows() and
timed() serve them too; their figures go in figures[<part>] and their rows in
report().
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402

console = Console(width=150)

COMMIT_VS_WRITE_TARGET = 3.0     # first commit / (CTAS + primary key), at most
ONE_ROW_COMMIT_TARGET_S = 1.0
STORAGE_TABLES = ("object", "head_row", "head_node", "changed_key", "commit")

WIDGET_TABLE = """create table public.widget (id int primary key, name text, price numeric, tags text[],
                                             meta jsonb, updated timestamptz)"""
# About 220 bytes a row: names from a few words, two-decimal prices, 0 to 4 tags, a small jsonb
# object, timestamps over two years.  setseed makes the rows the same in every run.
WIDGET_ROWS = """
    select setseed(0.5);
    insert into public.widget
    select g,
           initcap((array['red', 'blue', 'green', 'small', 'large', 'heavy', 'light', 'cheap', 'fancy', 'basic'])
                   [1 + (g * 31 + 7) % 10]) || ' ' ||
           (array['widget', 'gadget', 'sprocket', 'bracket', 'hinge', 'valve', 'gear', 'spring', 'bolt', 'lever',
                  'pulley'])[1 + (g * 17) % 11] || ' ' || (g % 997)::text,
           round((1 + random() * 999)::numeric, 2),
           array(select t from unnest(array['steel', 'plastic', 'outdoor', 'kitchen', 'garden', 'sale', 'new', 'bulk',
                                            'eco', 'premium', 'spare', 'kit']) with ordinality u(t, i)
                 where (g * 7 + i * 13) % 5 = 0),
           jsonb_build_object('color', (array['black', 'white', 'silver', 'red', 'navy', 'olive', 'tan'])[1 + g % 7],
                              'weight_g', (random() * 5000)::int, 'supplier', 'supplier-' || (g % 313)::text,
                              'in_stock', g % 3 <> 0, 'note', substr(md5(g::text), 1, 8 + g % 8)),
           timestamptz '2024-01-01 00:00:00+00' + random() * interval '700 days'
    from generate_series(1, %s) g;
    analyze public.widget"""


# --- helpers (for the pull parts too) -------------------------------------------------------

def timed(fn):
    """(fn(), seconds it took)."""
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def create_widget_table(cluster):
    cluster.sql(WIDGET_TABLE)


def load_widgets(cluster, rows):
    create_widget_table(cluster)
    cluster.sql(WIDGET_ROWS.replace("%s", str(int(rows))))


def change_rows(cluster, count, rows):
    """Change `count` rows spread evenly over the table; how many changed."""
    step = max(1, rows // count)
    return cluster.scalar("with u as (update public.widget set price = price + 1, updated = now() "
                          "where id %% %s = 0 and id <= %s returning 1) select count(*) from u",
                          step, step * count)


def storage_rows(cluster):
    """Rows of the bundle tables that grow with commits."""
    return dict(cluster.sql("select 'object', count(*) from bundle.object union all "
                            "select 'head_row', count(*) from bundle.head_row union all "
                            "select 'head_node', count(*) from bundle.head_node"))


def sizes(cluster):
    """Total size (heap, indexes, TOAST) in bytes of the widget table and of each bundle table."""
    out = {"widget": cluster.scalar("select pg_total_relation_size('public.widget')")}
    for t in STORAGE_TABLES:
        out[t] = cluster.scalar(f"select pg_total_relation_size('bundle.{t}')")
    return out


# --- parts ----------------------------------------------------------------------------------

def native(bed, args, figures):
    """Writing the same data once, and dumping it."""
    alice = bed.alice
    with alice.connect() as conn:
        _, figures["ctas_s"] = timed(lambda: conn.execute("create table public.widget_copy as "
                                                          "select * from public.widget"))
        _, figures["pk_s"] = timed(lambda: conn.execute("alter table public.widget_copy add primary key (id)"))
        conn.execute("drop table public.widget_copy")
        conn.execute("checkpoint")
    info = alice.conninfo()
    argv = [os.path.join(tb.pg_bindir(), "pg_dump"), "-h", str(info["host"]), "-p", str(info["port"]),
            "-U", str(info["user"]), "-t", "public.widget", str(info["dbname"])]
    with open(os.devnull, "wb") as devnull:
        done, figures["pg_dump_s"] = timed(lambda: subprocess.run(argv, stdout=devnull, stderr=subprocess.PIPE))
    if done.returncode != 0:
        raise RuntimeError(f"pg_dump exited {done.returncode}: {done.stderr.decode(errors='replace')}")


def aquapeer(bed, args, figures):
    """track, the first commit, status and commits of one and of --changed rows, storage.

    One session, as a user's would be: the first commit pays for loading PL/Python and aquapeer
    in it (a fraction of a second), the later ones do not."""
    alice = bed.alice
    with alice.connect() as conn:
        run = lambda sql: lambda: conn.execute(sql).fetchall()  # noqa: E731
        conn.execute("select bundle.create('widget')")
        _, figures["track_s"] = timed(run("select bundle.track('widget', 'public.widget')"))
        _, figures["first_commit_s"] = timed(run("select bundle.commit('widget', 'all widgets')"))
        conn.execute("checkpoint")

        change_rows(alice, 1, args.rows)
        status, figures["status_s"] = timed(run("select * from bundle.status('widget')"))
        if len(status) != 1:
            raise RuntimeError(f"bundle.status after one change: {status}")
        before = storage_rows(alice)
        _, figures["one_row_commit_s"] = timed(run("select bundle.commit('widget', 'one row')"))
        after = storage_rows(alice)
        figures["one_row_added"] = {t: after[t] - before[t] for t in after}

        figures["changed"] = change_rows(alice, args.changed, args.rows)
        _, figures["changed_commit_s"] = timed(run("select bundle.commit('widget', 'some rows')"))
    figures["sizes"] = sizes(alice)


def clean_up(bed, args, figures):
    """Drop the bundle and compact its tables, so that the next round starts as the first did."""
    bed.alice.sql("delete from bundle.bundle where name = 'widget'")
    bed.alice.sql("vacuum full bundle.object, bundle.head_row, bundle.head_node, bundle.changed_key, bundle.commit")
    bed.alice.sql("checkpoint")


PARTS = (("native", native), ("aquapeer", aquapeer), ("clean up", clean_up))


# --- output ---------------------------------------------------------------------------------

def fmt(v, digits=2):
    return "" if v is None else f"{v:,.{digits}f}"


def verdict(ok):
    return "" if ok is None else ("[green]met[/]" if ok else "[red]missed[/]")


def best(rounds, key):
    values = [r[key] for r in rounds if r.get(key) is not None]
    return min(values) if values else None


def per_s(rows, seconds):
    return None if not seconds else rows / seconds


def report(args, rounds, errors):
    write = None
    if all(r.get("ctas_s") is not None and r.get("pk_s") is not None for r in rounds) and rounds:
        write = min(r["ctas_s"] + r["pk_s"] for r in rounds)
    dump, first = best(rounds, "pg_dump_s"), best(rounds, "first_commit_s")
    one, changed = best(rounds, "one_row_commit_s"), best(rounds, "changed_commit_s")
    track, status = best(rounds, "track_s"), best(rounds, "status_s")
    last = rounds[-1] if rounds else {}
    first_round = rounds[0] if rounds else {}
    ratio_write = None if first is None or not write else first / write
    ratio_dump = None if first is None or not dump else first / dump

    table = Table(title=f"aquapeer bundles vs PostgreSQL on widget, {args.rows:,} rows "
                        f"(best of {len(rounds)} round{'s' if len(rounds) != 1 else ''})")
    for column in ("what", "aquapeer", "s", "rows/s", "native reference", "s", "rows/s", "aquapeer/native",
                   "target", ""):
        table.add_column(column)
    table.add_row("whole table", "bundle.commit, the first", fmt(first), fmt(per_s(args.rows, first), 0),
                  "CREATE TABLE AS + primary key", fmt(write), fmt(per_s(args.rows, write), 0), fmt(ratio_write),
                  f"≤ {COMMIT_VS_WRITE_TARGET:g}×",
                  verdict(None if ratio_write is None else ratio_write <= COMMIT_VS_WRITE_TARGET))
    table.add_row("", "", "", "", "pg_dump -t widget > /dev/null", fmt(dump), fmt(per_s(args.rows, dump), 0),
                  fmt(ratio_dump), "", "")
    table.add_row("", "bundle.track (before it)", fmt(track, 3), "", "", "", "", "", "", "")
    table.add_row("one changed row", "bundle.status", fmt(status, 3), "", "", "", "", "", "", "")
    table.add_row("", "bundle.commit", fmt(one, 3), "", "", "", "", "", f"< {ONE_ROW_COMMIT_TARGET_S:g} s",
                  verdict(None if one is None else one < ONE_ROW_COMMIT_TARGET_S))
    added = last.get("one_row_added")
    table.add_row("", "storage rows added", ", ".join(f"{t} +{n}" for t, n in added.items()) if added else "",
                  "", "", "", "", "", "a handful", "")
    table.add_row(f"{last.get('changed', args.changed):,} changed rows", "bundle.commit", fmt(changed, 3),
                  fmt(per_s(last.get("changed", args.changed), changed), 0), "", "", "", "", "", "")
    console.print(table)

    s = first_round.get("sizes")
    if s:
        table = Table(title="storage after the commits of the first round, MB (heap, indexes and TOAST)")
        for column in ("public.widget", *(f"bundle.{t}" for t in STORAGE_TABLES), "bundle, total", "bundle/widget"):
            table.add_column(column)
        total = sum(s[t] for t in STORAGE_TABLES)
        mb = lambda b: fmt(b / 2**20, 1)  # noqa: E731
        table.add_row(mb(s["widget"]), *(mb(s[t]) for t in STORAGE_TABLES), mb(total), fmt(total / s["widget"]))
        table.caption = "bundle.object holds every commit's objects: blobs, buckets, fan nodes, roots, commits"
        console.print(table)

    for part, message in errors.items():
        console.print(f"[bold red]failed: {part}:[/] {message}")
    return {"rows": args.rows, "changed": args.changed, "rounds": rounds,
            "first_commit_vs_write": ratio_write, "first_commit_vs_pg_dump": ratio_dump,
            "targets": {"first_commit": None if ratio_write is None else ratio_write <= COMMIT_VS_WRITE_TARGET,
                        "one_row_commit": None if one is None else one < ONE_ROW_COMMIT_TARGET_S},
            "errors": errors or None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the widget table (default: 1000000)")
    parser.add_argument("--changed", type=int, default=1000,
                        help="rows changed for the commit of many rows (default: 1000)")
    parser.add_argument("--rounds", type=int, default=1, help="run everything this many times (default: 1)")
    parser.add_argument("--conf", action="append", default=[], metavar="NAME=VALUE",
                        help="a server setting beyond the test bed's (repeatable), e.g. shared_buffers=1GB")
    parser.add_argument("--json", action="store_true", help="print the figures as one line of JSON too")
    args = parser.parse_args()
    if args.rows < args.changed or args.changed < 1 or args.rounds < 1:
        parser.error("need 1 <= --changed <= --rows and --rounds >= 1")
    conf = dict(c.split("=", 1) for c in args.conf)

    rounds, errors = [], {}
    with tb.Testbed(1, names=["alice"], extra_conf=conf) as bed:
        bed.alice.sql("create extension aquapeer cascade")
        _, loaded_s = timed(lambda: load_widgets(bed.alice, args.rows))
        console.print(f"loaded {args.rows:,} widgets in {loaded_s:.1f} s: "
                      f"{bed.alice.scalar('select pg_size_pretty(pg_table_size(%s))', 'public.widget')} "
                      f"(table without indexes); server settings beyond the test bed's: {conf or 'none'}")
        for n in range(args.rounds):
            figures = {}
            rounds.append(figures)
            for name, part in PARTS:
                try:
                    part(bed, args, figures)
                except Exception as e:  # noqa: BLE001 - reported with the other figures
                    errors[f"round {n + 1}, {name}"] = f"{e!r}"
                    console.print(traceback.format_exc())

    summary = report(args, rounds, errors)
    if args.json:
        print(json.dumps(summary, default=str), flush=True)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
