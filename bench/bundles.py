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
  schema's tables against the table's;
- the object format's floor for that first commit, with the commit's own
  statement: every row's key, blob and their SHA-256s, then the same with
  each blob written once under its id (what any commit in this format must
  do at least).

With --rounds N everything runs N times (a fresh bundle each round) and the
table shows each figure's best round (noise on a shared machine only adds
time); --json prints every round's figures as one line of JSON.

Between two clusters, alice and bob, friends through a local signaling
server:

- native reference: `pg_dump -t widget` of alice piped into `psql` on bob (a
  database of its own);
- aquapeer: peer.pull_bundle of the whole bundle into bob's empty widget
  table (target: at least 0.35 times the rows per second of pg_dump | psql),
  with the bytes on the wire and the compression ratio (the objects' bytes
  over the bytes received), the CPU time it took: the whole machine's
  (both clusters run on it) and the two workers' (moving the bytes), and
  each worker's worst loop lag meanwhile (target: at most 100 ms);
- --changed rows changed, committed and pulled, end to end, twice: right after
  the clone (which also pays once for the hint bits and statistics of the
  million rows the clone wrote), then again (target: under 2 s).

Each part is a function part(bed, args, figures) in PARTS, run in order on
the same test bed; a part that fails is reported and the next one still runs.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402
from procinfo import cpu_seconds, machine_busy_seconds, worker_pid  # noqa: E402

console = Console(width=150)

COMMIT_VS_WRITE_TARGET = 3.0     # first commit / (CTAS + primary key), at most
ONE_ROW_COMMIT_TARGET_S = 1.0
PULL_VS_DUMP_TARGET = 0.35       # pull rows/s / (pg_dump | psql) rows/s, at least
INCREMENTAL_TARGET_S = 2.0
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
        format_floor(conn, figures)
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


def format_floor(conn, figures):
    """What any first commit in the object format must do at least, timed with the statement the
    commit runs (bundle._row_hashes_query, under the settings of bundle._row_hashes): every row's
    key, key hash, blob and blob id; then the same again with each blob written once under its
    id, with a primary key.  A commit does that and more (the tree of key hashes, the head's
    rows), so the second against CTAS + primary key bounds from below what the first commit can
    reach.  Rolled back: the bundle is untouched."""
    rows = conn.execute("select bundle._row_hashes_query('public.widget', null, '{id}', null)").fetchone()[0]
    settings = conn.execute("select proconfig from pg_proc where oid = 'bundle._row_hashes'::regproc").fetchone()[0]
    # The condition makes every column be computed; count(*) alone, or a select list without the
    # key hash, would skip them.
    every_row = f"from ({rows}) r where r.key_hash is not null and r.blob_id is not null"
    with conn.transaction(force_rollback=True):
        for setting in settings:
            name, _, value = setting.partition("=")
            conn.execute("select set_config(%s, %s, true)", (name, value))
        _, figures["floor_row_hashes_s"] = timed(lambda: conn.execute(f"select count(*) {every_row}").fetchall())
        _, write = timed(lambda: conn.execute(f"create table public.widget_blobs as select blob_id, blob {every_row}"))
        _, key = timed(lambda: conn.execute("alter table public.widget_blobs add primary key (blob_id)"))
    figures["floor_write_blobs_s"] = write + key
    conn.execute("checkpoint")  # the commit after it should not pay for this WAL


def dump_into_bob(bed, args, figures):
    """pg_dump -t widget of alice piped into psql on bob, into a database of its own."""
    alice, bob = bed.alice, bed.bob
    bob.sql("drop database if exists dumped")
    bob.sql("create database dumped")
    # The dump names the capture triggers of a tracked table (from the second round on).
    bob.sql("create extension aquapeer cascade", dbname="dumped")
    source, target = alice.conninfo(), bob.conninfo("dumped")
    bindir = tb.pg_bindir()
    dump = [os.path.join(bindir, "pg_dump"), "-h", str(source["host"]), "-p", str(source["port"]),
            "-U", str(source["user"]), "-t", "public.widget", str(source["dbname"])]
    restore = [os.path.join(bindir, "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-h", str(target["host"]),
               "-p", str(target["port"]), "-U", str(target["user"]), str(target["dbname"])]

    def pipe():
        dumper = subprocess.Popen(dump, stdout=subprocess.PIPE)
        restored = subprocess.run(restore, stdin=dumper.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        dumper.stdout.close()
        if dumper.wait() != 0 or restored.returncode != 0:
            raise RuntimeError(f"pg_dump | psql failed: {restored.stderr.decode(errors='replace')}")
    _, figures["dump_restore_s"] = timed(pipe)
    bob.sql("drop database dumped")


class LoopLag:
    """The worst loop lag each worker reports while a block runs: peer.worker_status() keeps the
    worst per second of the last minute, so it is read more often than that."""

    EVERY_S = 10.0

    def __init__(self, clusters):
        self.clusters, self.worst = clusters, dict.fromkeys(clusters, 0.0)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _read(self):
        for who, cluster in self.clusters.items():
            lag = cluster.scalar("select (peer.worker_status()).loop_lag_max_ms")
            self.worst[who] = max(self.worst[who], lag or 0.0)

    def _watch(self):
        while not self.done.wait(self.EVERY_S):
            self._read()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self._read()


def pull(bed, args, figures):
    """peer.pull_bundle of the whole bundle into bob's empty table, then --changed rows end to end."""
    alice, bob = bed.alice, bed.bob
    alice.sql("select peer.share_bundle('widget', 'bob')")
    workers = {"alice": worker_pid(alice), "bob": worker_pid(bob)}
    with bob.connect() as conn:
        cpu_before = {who: cpu_seconds(pid) for who, pid in workers.items()}
        busy_before = machine_busy_seconds()
        with LoopLag({"alice": alice, "bob": bob}) as lag:
            summary, figures["pull_s"] = timed(lambda: json.loads(conn.execute(
                "select peer.pull_bundle('alice', 'widget')::text").fetchone()[0]))
        figures["pull_loop_lag_ms"] = lag.worst
        # Both clusters share this machine: how much of its CPU the clone used, and how much of
        # that the two workers spent moving bytes (aiortc's SCTP and DTLS are pure Python).
        figures["pull_machine_cpu_s"] = machine_busy_seconds() - busy_before
        figures["pull_worker_cpu_s"] = {who: cpu_seconds(pid) - cpu_before[who] for who, pid in workers.items()}
        # The transfer ends once everything fetched is kept; the rest is the merge and checkout.
        figures["pull_checkout_s"] = conn.execute(
            "select extract(epoch from clock_timestamp() - finished_at)::float8 from peer.transfer "
            "where id = %s", [summary["transfer"]]).fetchone()[0]
    if bob.scalar("select count(*) from public.widget") != args.rows:
        raise RuntimeError(f"bob has {bob.scalar('select count(*) from public.widget')} widgets after the pull")
    figures["pull_fetch_s"] = bob.scalar("select extract(epoch from finished_at - started_at)::float8 "
                                         "from peer.transfer where id = %s", summary["transfer"])
    figures["pull_bytes"] = summary["bytes"]
    figures["pull_objects"] = summary["objects"]
    figures["pull_object_bytes"] = bob.scalar("select sum(length(data)) from bundle.object "
                                              "where bundle = 'widget' and kind <> 'commit'")

    def change_commit_pull():
        figures["incremental_changed"] = change_rows(alice, args.changed, args.rows)
        alice.sql("select bundle.commit('widget', 'changed again')")
        return json.loads(bob.scalar("select peer.pull_bundle('alice', 'widget')::text"))
    # The first right after the clone also pays once for what the clone left behind: the hint
    # bits of a million rows just written, their statistics, a checkpoint.  The second shows
    # what each later pull of that many changes costs; the target is judged on it.
    _, figures["incremental_after_clone_s"] = timed(change_commit_pull)
    summary, figures["incremental_s"] = timed(change_commit_pull)
    figures["incremental_fetch_s"] = bob.scalar("select extract(epoch from finished_at - started_at)::float8 "
                                                "from peer.transfer where id = %s", summary["transfer"])
    figures["incremental_bytes"] = summary["bytes"]
    if summary["blobs"] != figures["incremental_changed"]:
        raise RuntimeError(f"the incremental pull fetched {summary['blobs']} rows, not "
                           f"{figures['incremental_changed']}")


def clean_up(bed, args, figures):
    """Drop the bundle and compact its tables, so that the next round starts as the first did."""
    for cluster in bed:
        cluster.sql("delete from bundle.bundle where name = 'widget'")
        cluster.sql("vacuum full bundle.object, bundle.head_row, bundle.head_node, bundle.changed_key, "
                    "bundle.commit, bundle.pending")
        cluster.sql("checkpoint")
    bed.bob.sql("truncate public.widget")


PARTS = (("native", native), ("pg_dump | psql", dump_into_bob), ("aquapeer", aquapeer), ("pull", pull),
         ("clean up", clean_up))


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
    hashes, floor = best(rounds, "floor_row_hashes_s"), best(rounds, "floor_write_blobs_s")
    ratio_hashes = None if hashes is None or not write else hashes / write
    ratio_floor = None if floor is None or not write else floor / write

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
    table.add_row("", "its floor: every row's key, blob, their SHA-256s", fmt(hashes), "", "", "", "",
                  fmt(ratio_hashes), "", "")
    table.add_row("", "its floor: the same, each blob written once", fmt(floor), "", "", "", "",
                  fmt(ratio_floor), "", "")
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

    dump_restore, pull_s = best(rounds, "dump_restore_s"), best(rounds, "pull_s")
    incremental = best(rounds, "incremental_s")
    ratio_pull = None if not pull_s or not dump_restore else dump_restore / pull_s
    table = Table(title="between two clusters")
    for column in ("what", "aquapeer", "s", "rows/s", "native reference", "s", "rows/s", "aquapeer/native",
                   "target", ""):
        table.add_column(column)
    table.add_row("whole bundle into an empty table", "peer.pull_bundle", fmt(pull_s),
                  fmt(per_s(args.rows, pull_s), 0), "pg_dump -t widget | psql", fmt(dump_restore),
                  fmt(per_s(args.rows, dump_restore), 0), fmt(ratio_pull), f"≥ {PULL_VS_DUMP_TARGET:g}×",
                  verdict(None if ratio_pull is None else ratio_pull >= PULL_VS_DUMP_TARGET))
    if last.get("pull_fetch_s") is not None:
        table.add_row("", "of which fetching and keeping", fmt(last["pull_fetch_s"]), "", "", "", "", "", "", "")
    if last.get("pull_checkout_s") is not None:
        table.add_row("", "of which checking out", fmt(last["pull_checkout_s"]), "", "", "", "", "", "", "")
    if last.get("pull_machine_cpu_s") is not None:
        workers = last["pull_worker_cpu_s"]
        table.add_row("", "CPU, the whole machine", f"{last['pull_machine_cpu_s']:,.1f} s", "",
                      "of which the workers", f"alice {workers['alice']:,.1f} s, bob {workers['bob']:,.1f} s",
                      "", f"{os.cpu_count()} cores", "", "")
    if last.get("pull_loop_lag_ms"):
        lag = last["pull_loop_lag_ms"]
        table.add_row("", "worst loop lag", f"alice {lag['alice']:,.0f} ms, bob {lag['bob']:,.0f} ms", "", "", "",
                      "", "", "≤ 100 ms", verdict(max(lag.values()) <= 100))
    if last.get("pull_bytes"):
        table.add_row("", "on the wire", f"{last['pull_bytes'] / 2**20:,.1f} MB", "",
                      "objects kept", f"{last['pull_object_bytes'] / 2**20:,.1f} MB", "",
                      f"compressed {last['pull_object_bytes'] / last['pull_bytes']:.1f}×", "", "")
    table.add_row(f"{last.get('incremental_changed', args.changed):,} changed rows",
                  "commit + peer.pull_bundle", fmt(incremental, 3), "", "", "", "", "",
                  f"< {INCREMENTAL_TARGET_S:g} s",
                  verdict(None if incremental is None else incremental < INCREMENTAL_TARGET_S))
    table.add_row("", "the same, the first after the clone", fmt(best(rounds, "incremental_after_clone_s"), 3),
                  "", "", "", "", "", "", "")
    if last.get("incremental_fetch_s") is not None:
        table.add_row("", "of which fetching and keeping", fmt(last["incremental_fetch_s"], 3),
                      "", "", "", "", "", "", "")
    if last.get("incremental_bytes") is not None:
        table.add_row("", "on the wire", f"{last['incremental_bytes'] / 2**10:,.1f} KB", "", "", "", "", "", "", "")
    console.print(table)

    for part, message in errors.items():
        console.print(f"[bold red]failed: {part}:[/] {message}")
    return {"rows": args.rows, "changed": args.changed, "rounds": rounds,
            "first_commit_vs_write": ratio_write, "first_commit_vs_pg_dump": ratio_dump,
            "format_floor_vs_write": ratio_floor,
            "pull_vs_dump_restore": ratio_pull,
            "targets": {"first_commit": None if ratio_write is None else ratio_write <= COMMIT_VS_WRITE_TARGET,
                        "one_row_commit": None if one is None else one < ONE_ROW_COMMIT_TARGET_S,
                        "pull": None if ratio_pull is None else ratio_pull >= PULL_VS_DUMP_TARGET,
                        "incremental": None if incremental is None else incremental < INCREMENTAL_TARGET_S},
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
    signal_server = tb.SignalServer().start()
    try:
        with tb.Testbed(2, names=["alice", "bob"], extra_conf=conf) as bed:
            for cluster in bed:
                tb.join_signaling(cluster, signal_server.url)
            tb.befriend(bed.alice, "alice", bed.bob, "bob")
            create_widget_table(bed.bob)
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
    finally:
        signal_server.stop()

    summary = report(args, rounds, errors)
    if args.json:
        print(json.dumps(summary, default=str), flush=True)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
