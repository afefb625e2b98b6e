"""Benchmark bundles against PostgreSQL writing, dumping and restoring the same table.

Run with `make bench` (or `.venv/bin/python bench/bundles.py --rows 50000` for a
quick run).  Two real clusters (the test bed's settings), alice and bob,
friends through a local signaling server, and on alice a table

    widget(id int primary key, name text, price numeric, tags text[], meta jsonb, updated timestamptz)

of realistic values (about 244 MB for 1,000,000 rows).  Everything below runs
once for each size of --rows (default 1,000,000 then 50,000), each size with
its own table; issue 21's targets are judged at each size, side by side in one
table at the end:

- the first bundle.commit of the whole table against `CREATE TABLE AS` plus
  its primary key, writing the same data once (target: at most 3 times), and
  against `pg_dump -t widget` to /dev/null; beside it the object format's
  floor for that commit, with the commit's own statement: every row's key,
  text and their SHA-256s, then the same with the rows written once in their
  buckets (what any commit in this format must do at least);
- the bundle schema's tables right after that commit against the table
  (target: at most 1.0 times, heap, indexes and TOAST on both sides);
- bundle.status after one changed row, a commit of that one row (target:
  under 0.05 s, and a handful of storage rows: rows of bundle.object and
  head_node counted before and after), a commit of --changed rows;
- peer.pull_bundle of the whole bundle into bob's empty widget table against
  `pg_dump -t widget` of alice piped into `psql` on bob (target: at least 0.4
  times its rows per second; at 50,000 rows also at most 1.5 s end to end),
  with the bytes on the wire and the compression ratio (the objects' bytes
  over the bytes received), each worker's worst loop lag (target: at most
  100 ms), and the CPU time of every process of both clusters meanwhile:
  the workers (moving the bytes), bob's backend running the pull, the
  executors serving and keeping the objects on both sides, sampled as they
  come and go, and the whole machine's (both clusters run on it);
- --changed rows changed, committed and pulled, end to end, twice: right after
  the clone (which also pays once for the hint bits and statistics of the rows
  the clone wrote), then again (target: at most 1.0 s);
- `aquapeer export` of the bundle to a file against `pg_dump -t widget` to a
  file, then `aquapeer import` of it into a fresh database of bob's (the empty
  table and the extension only) against `psql` restoring the dump into
  another (target: at most 3 times), and bundle.checkout of what was imported;
  at every size unless --import-rows caps it (a million rows take about 2.5
  minutes in all, and 650 MB of export in a temporary directory).

With --rounds N everything of a size runs N times (a fresh bundle each round)
and the tables show each figure's best round (noise on a shared machine only
adds time); --json prints every size's figures, each round's, as one line of
JSON.

Each part is a function part(bed, args, figures) in PARTS, run in order on
the same test bed, with args.rows the size at hand; a part that fails is
reported and the next one still runs.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402
from procinfo import cpu_seconds, ended_children_cpu_seconds, machine_busy_seconds  # noqa: E402

console = Console(width=170)

# Issue 21's targets.
COMMIT_VS_WRITE_TARGET = 3.0     # first commit / (CTAS + primary key), at most
STORE_VS_TABLE_TARGET = 1.0      # bundle tables after the first commit / the table, at most
PULL_VS_DUMP_TARGET = 0.4        # pull rows/s / (pg_dump | psql) rows/s, at least
SMALL_CLONE_ROWS, SMALL_CLONE_TARGET_S = 50_000, 1.5  # a clone of that many rows, end to end, at most
INCREMENTAL_TARGET_S = 1.0       # --changed rows committed and pulled, at most
ONE_ROW_COMMIT_TARGET_S = 0.05   # under
LOOP_LAG_TARGET_MS = 100.0       # each worker's worst during the clone, at most
IMPORT_VS_RESTORE_TARGET = 3.0   # aquapeer import / psql restoring a pg_dump, at most

PULLER = "backend running peer.pull_bundle"
STORAGE_TABLES = ("object", "head_node", "changed_key", "commit")
CLI = Path(os.environ.get("AQUAPEER_BINDIR") or "/usr/local/bin") / "aquapeer"

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
    """A widget table of `rows` rows in place of the last size's."""
    cluster.sql("drop table if exists public.widget")
    create_widget_table(cluster)
    cluster.sql(WIDGET_ROWS.replace("%s", str(int(rows))))


def client_argv(program, cluster, *options, dbname="postgres"):
    """The test bed's `program` (pg_dump, psql) with `options`, on `dbname` of `cluster`."""
    info = cluster.conninfo(dbname)
    return [os.path.join(tb.pg_bindir(), program), "-h", str(info["host"]), "-p", str(info["port"]),
            "-U", str(info["user"]), *options, str(info["dbname"])]


def run(argv, **kw):
    """Run a program to its end; raise with what it wrote to stderr if it fails."""
    done = subprocess.run(argv, stderr=subprocess.PIPE, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(argv[0])} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')}")
    return done


def fresh_database(cluster, name):
    """An empty database with the extension: what a dump of a tracked table names (its capture
    triggers, from the second round on) and what an import needs."""
    cluster.sql(f"drop database if exists {name}")
    cluster.sql(f"create database {name}")
    cluster.sql("create extension aquapeer cascade", dbname=name)


def change_rows(cluster, count, rows):
    """Change `count` rows spread evenly over the table; how many changed."""
    step = max(1, rows // count)
    return cluster.scalar("with u as (update public.widget set price = price + 1, updated = now() "
                          "where id %% %s = 0 and id <= %s returning 1) select count(*) from u",
                          step, step * count)


def storage_rows(cluster):
    """Rows of the bundle tables that grow with commits."""
    return dict(cluster.sql("select 'object', count(*) from bundle.object union all "
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
    with open(os.devnull, "wb") as devnull:
        _, figures["pg_dump_s"] = timed(lambda: run(client_argv("pg_dump", alice, "-t", "public.widget"),
                                                    stdout=devnull))


def aquapeer(bed, args, figures):
    """track, the first commit, status and commits of one and of --changed rows, storage.

    One session, as a user's would be: the first commit pays for loading PL/Python and aquapeer
    in it (a fraction of a second), the later ones do not."""
    alice = bed.alice
    with alice.connect() as conn:
        query = lambda sql: lambda: conn.execute(sql).fetchall()  # noqa: E731
        conn.execute("select bundle.create('widget')")
        _, figures["track_s"] = timed(query("select bundle.track('widget', 'public.widget')"))
        format_floor(conn, figures)
        _, figures["first_commit_s"] = timed(query("select bundle.commit('widget', 'all widgets')"))
        conn.execute("checkpoint")
        figures["sizes"] = sizes(alice)

        change_rows(alice, 1, args.rows)
        status, figures["status_s"] = timed(query("select * from bundle.status('widget')"))
        if len(status) != 1:
            raise RuntimeError(f"bundle.status after one change: {status}")
        before = storage_rows(alice)
        _, figures["one_row_commit_s"] = timed(query("select bundle.commit('widget', 'one row')"))
        after = storage_rows(alice)
        figures["one_row_added"] = {t: after[t] - before[t] for t in after}

        figures["changed"] = change_rows(alice, args.changed, args.rows)
        _, figures["changed_commit_s"] = timed(query("select bundle.commit('widget', 'some rows')"))


def format_floor(conn, figures):
    """What any first commit in the object format must do at least, timed with the statement the
    commit runs (bundle._row_hashes_query, under the settings of bundle._row_hashes): every row's
    key, key hash, text and row hash; then the same again with the rows written once, in their
    buckets (aquapeer-bundle/2: one row per bucket, its lines by key hash, under the bucket's
    id, with a primary key).  A commit does that and more (the fan nodes, the head's nodes), so
    the second against CTAS + primary key bounds from below what the first commit can reach.
    Rolled back: the bundle is untouched."""
    rows = conn.execute("select bundle._row_hashes_query('public.widget', null, '{id}', null)").fetchone()[0]
    # The condition makes every column be computed; count(*) alone, or a select list without the
    # key hash, would skip them.
    every_row = f"from ({rows}) r where r.key_hash is not null and r.blob_id is not null"
    with conn.transaction(force_rollback=True):
        tb.use_row_hash_settings(conn, local=True)
        # As bundle._stage sorts and as the store compresses (bundle.object's data is lz4).
        conn.execute("set local work_mem = '256MB'; set local default_toast_compression = 'lz4'")
        _, figures["floor_row_hashes_s"] = timed(lambda: conn.execute(f"select count(*) {every_row}").fetchall())
        _, write = timed(lambda: conn.execute(
            "create table public.widget_buckets as select encode(sha256(b.data), 'hex') as id, b.data from ("
            "select bundle._bucket(string_agg(r.key_hash || ' ' || r.blob || E'\\n', '' "
            f"order by r.key_hash collate \"C\")) as data {every_row} group by left(r.key_hash, 4)) b"))
        _, key = timed(lambda: conn.execute("alter table public.widget_buckets add primary key (id)"))
    figures["floor_write_blobs_s"] = write + key
    conn.execute("checkpoint")  # the commit after it should not pay for this WAL


def dump_into_bob(bed, args, figures):
    """pg_dump -t widget of alice piped into psql on bob, into a database of its own."""
    alice, bob = bed.alice, bed.bob
    fresh_database(bob, "dumped")

    def pipe():
        dumper = subprocess.Popen(client_argv("pg_dump", alice, "-t", "public.widget"), stdout=subprocess.PIPE)
        restored = subprocess.run(client_argv("psql", bob, "-q", "-v", "ON_ERROR_STOP=1", dbname="dumped"),
                                  stdin=dumper.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        dumper.stdout.close()
        if dumper.wait() != 0 or restored.returncode != 0:
            raise RuntimeError(f"pg_dump | psql failed: {restored.stderr.decode(errors='replace')}")
    _, figures["dump_restore_s"] = timed(pipe)
    bob.sql("drop database dumped")


class Sampler:
    """Reads something in a thread every EVERY_S seconds (each kind sets its own) while a block
    runs, and once at its end."""

    def __init__(self):
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _read(self):
        raise NotImplementedError

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


class LoopLag(Sampler):
    """The worst loop lag each worker reports while a block runs: peer.worker_status() keeps the
    worst per second of the last minute, so it is read more often than that.  Each read covers
    up to a minute before it, so the worst of the minute before the block is kept too: where the
    two are equal, the block's own worst was at most that."""

    EVERY_S = 10.0

    def __init__(self, clusters):
        super().__init__()
        self.clusters, self.worst = clusters, dict.fromkeys(clusters, 0.0)

    def _lags(self):
        return {who: cluster.scalar("select (peer.worker_status()).loop_lag_max_ms") or 0.0
                for who, cluster in self.clusters.items()}

    def __enter__(self):
        self.before = self._lags()
        return super().__enter__()

    def _read(self):
        for who, lag in self._lags().items():
            self.worst[who] = max(self.worst[who], lag)


class ProcessCpu(Sampler):
    """The CPU seconds each process of some clusters spends while a block runs, by its
    backend_type in pg_stat_activity (or the label given for its pid), and the whole machine's.

    Executors come and go during a pull, so the processes are sampled every EVERY_S.  What a
    process spent between its last sample and its end, or one that came and went between two
    samples, is counted from its postmaster, which waits for every process it started: the CPU of
    its ended children grew by that plus what was sampled of them.  One figure per cluster."""

    EVERY_S = 0.1
    ENDED = "ended between samples"

    def __init__(self, clusters, labels=None):
        super().__init__()
        self.clusters, self.labels = clusters, labels or {}  # labels: {(who, pid): label}
        self.seen = {}     # (who, pid) -> [label, CPU seconds at the start (0 if it started later), latest]
        self.alive = {}    # who -> the pids of the latest sample
        self.spent = None  # {who: {label: [CPU seconds of each process, most first]}}, once the block ended

    def __enter__(self):
        self.conns = {who: cluster.connect() for who, cluster in self.clusters.items()}
        self.postmasters = {}
        for who, cluster in self.clusters.items():
            pid = cluster.postmaster_pid()
            self.postmasters[who] = (pid, cpu_seconds(pid), ended_children_cpu_seconds(pid))
        self.machine_before = machine_busy_seconds()
        self._read(starting=True)
        return super().__enter__()

    def _read(self, starting=False):
        for who, conn in self.conns.items():
            alive = set()
            for pid, backend_type in conn.execute("select pid, backend_type from pg_stat_activity").fetchall():
                try:
                    cpu = cpu_seconds(pid)
                except OSError:  # it ended since
                    continue
                process = self.seen.setdefault((who, pid), [self.labels.get((who, pid), backend_type),
                                                            cpu if starting else 0.0, cpu])
                process[2] = cpu
                alive.add(pid)
            self.alive[who] = alive

    def __exit__(self, *exc):
        super().__exit__(*exc)
        # Both clusters share this machine: how much of its CPU the block used in all.
        self.machine_s = machine_busy_seconds() - self.machine_before
        self.spent = {}
        for who, (postmaster, cpu_before, ended_before) in self.postmasters.items():
            spent = {"postmaster": [cpu_seconds(postmaster) - cpu_before]}
            ended_sampled = 0.0
            for (cluster, pid), (label, start, latest) in self.seen.items():
                if cluster == who:
                    spent.setdefault(label, []).append(latest - start)
                    if pid not in self.alive[who]:
                        ended_sampled += latest
            spent[self.ENDED] = [max(0.0, ended_children_cpu_seconds(postmaster) - ended_before - ended_sampled)]
            self.spent[who] = {label: sorted(each, reverse=True) for label, each in spent.items()}
        for conn in self.conns.values():
            conn.close()


def pull(bed, args, figures):
    """peer.pull_bundle of the whole bundle into bob's empty table, then --changed rows end to end."""
    alice, bob = bed.alice, bed.bob
    alice.sql("select peer.share_bundle('widget', 'bob')")
    with bob.connect() as conn:
        puller = conn.execute("select pg_backend_pid()").fetchone()[0]
        with LoopLag({"alice": alice, "bob": bob}) as lag, \
                ProcessCpu({"alice": alice, "bob": bob}, {("bob", puller): PULLER}) as cpu:
            summary, figures["pull_s"] = timed(lambda: json.loads(conn.execute(
                "select peer.pull_bundle('alice', 'widget')::text").fetchone()[0]))
            # The transfer ends once everything fetched is kept; the rest is the merge and checkout.
            figures["pull_checkout_s"] = conn.execute(
                "select extract(epoch from clock_timestamp() - finished_at)::float8 from peer.transfer "
                "where id = %s", [summary["transfer"]]).fetchone()[0]
        figures["pull_loop_lag_ms"], figures["pull_loop_lag_before_ms"] = lag.worst, lag.before
        figures["pull_cpu_s"], figures["pull_machine_cpu_s"] = cpu.spent, cpu.machine_s
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


def import_capped(args):
    """Whether --import-rows leaves export and import out at this size."""
    return args.import_rows is not None and args.rows > args.import_rows


def import_vs_restore(bed, args, figures):
    """`aquapeer export` of alice's bundle and `aquapeer import` of it into a fresh database of bob's
    (with the empty table), then bundle.checkout there; beside them pg_dump -t widget of the same
    table to a file and psql restoring it into another fresh database."""
    if import_capped(args):
        return
    alice, bob = bed.alice, bed.bob
    with tempfile.TemporaryDirectory(prefix="aquapeer-bench-") as directory:
        exported, dumped = os.path.join(directory, "widget.jsonl"), os.path.join(directory, "widget.sql")
        aquapeer_cli = lambda *argv: lambda: run([str(CLI), *argv], env=tb.outside_env(),  # noqa: E731
                                                 stdout=subprocess.DEVNULL)
        _, figures["export_s"] = timed(aquapeer_cli("export", "--dbname", alice.dsn, "widget", exported))
        _, figures["dump_file_s"] = timed(lambda: run(client_argv("pg_dump", alice, "-t", "public.widget",
                                                                  "-f", dumped)))
        figures["export_bytes"], figures["dump_bytes"] = os.path.getsize(exported), os.path.getsize(dumped)

        fresh_database(bob, "imported")
        bob.sql(WIDGET_TABLE, dbname="imported")
        _, figures["import_s"] = timed(aquapeer_cli("import", "--dbname", bob.dsn_for("imported"), exported))
        _, figures["import_checkout_s"] = timed(lambda: bob.sql("select bundle.checkout('widget')",
                                                                dbname="imported"))
        fresh_database(bob, "restored")
        _, figures["restore_s"] = timed(lambda: run(client_argv("psql", bob, "-q", "-v", "ON_ERROR_STOP=1",
                                                                "-f", dumped, dbname="restored"),
                                                    stdout=subprocess.DEVNULL))
    counts = {name: bob.scalar("select count(*) from public.widget", dbname=name) for name in ("imported", "restored")}
    for name in counts:
        bob.sql(f"drop database {name}")
    if counts != {"imported": args.rows, "restored": args.rows}:
        raise RuntimeError(f"widgets after the import and checkout, and after the restore: {counts}")


def clean_up(bed, args, figures):
    """Drop the bundle and compact its tables, so that the next round starts as the first did."""
    for cluster in bed:
        cluster.sql("delete from bundle.bundle where name = 'widget'")
        cluster.sql("vacuum full bundle.object, bundle.head_node, bundle.changed_key, "
                    "bundle.commit, bundle.pending")
        cluster.sql("checkpoint")
    bed.bob.sql("truncate public.widget")


PARTS = (("native", native), ("pg_dump | psql", dump_into_bob), ("aquapeer", aquapeer), ("pull", pull),
         ("export and import", import_vs_restore), ("clean up", clean_up))


# --- output ---------------------------------------------------------------------------------

def fmt(v, digits=2):
    return "" if v is None else f"{v:,.{digits}f}"


def verdict(ok):
    return "" if ok is None else ("[green]met[/]" if ok else "[red]missed[/]")


def best(rounds, key):
    values = [r[key] for r in rounds if r.get(key) is not None]
    return min(values) if values else None


def best_write(rounds):
    """CREATE TABLE AS plus the primary key, the best round."""
    return min((r["ctas_s"] + r["pk_s"] for r in rounds if r.get("ctas_s") is not None and r.get("pk_s") is not None),
               default=None)


def per_s(rows, seconds):
    return None if not seconds else rows / seconds


def ratio(a, b):
    return None if a is None or not b else a / b


def plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def mb(n_bytes):
    return None if n_bytes is None else n_bytes / 2**20


def megabytes(n_bytes):
    return "" if n_bytes is None else f"{fmt(mb(n_bytes), 1)} MB"


def seconds(v):
    return "" if v is None else f"{fmt(v, 3 if v < 1 else 2)} s"


def loop_lags(figures):
    """Each worker's worst loop lag during the clone; "≤" where the minute before it was as bad
    (LoopLag)."""
    lag, before = figures.get("pull_loop_lag_ms"), figures.get("pull_loop_lag_before_ms", {})
    if not lag:
        return ""
    return ", ".join(f"{who} {'≤ ' if ms <= before.get(who, 0.0) else ''}{ms:,.0f} ms" for who, ms in lag.items())


def judge(args, rounds):
    """Issue 21's table at one size: each figure (its best round; the store's size and the loop lag
    of the first and last round) beside its native reference and its target."""
    first_round, last = (rounds[0], rounds[-1]) if rounds else ({}, {})
    write = best_write(rounds)
    first, pull_s, dump_restore = best(rounds, "first_commit_s"), best(rounds, "pull_s"), best(rounds, "dump_restore_s")
    incremental, one = best(rounds, "incremental_s"), best(rounds, "one_row_commit_s")
    imported, restored = best(rounds, "import_s"), best(rounds, "restore_s")
    stored = first_round.get("sizes")
    store, table = (sum(stored[t] for t in STORAGE_TABLES), stored["widget"]) if stored else (None, None)
    lag = last.get("pull_loop_lag_ms")
    worst_lag = max(lag.values()) if lag else None
    at_most = lambda v, target: None if v is None else v <= target  # noqa: E731

    def row(key, what, aquapeer, value, reference="", reference_value="", ratio_=None, target="", met=None):
        return {"key": key, "what": what, "aquapeer": aquapeer, "value": value, "reference": reference,
                "reference_value": reference_value, "ratio": ratio_, "target": target, "met": met}
    judged = [
        row("first_commit", "first bundle.commit", "bundle.commit", seconds(first),
            "CREATE TABLE AS + primary key", seconds(write), ratio(first, write),
            f"≤ {COMMIT_VS_WRITE_TARGET:g}× the reference", at_most(ratio(first, write), COMMIT_VS_WRITE_TARGET)),
        row("store", "store size after that commit", "the bundle schema's tables", megabytes(store),
            "the table", megabytes(table), ratio(store, table), f"≤ {STORE_VS_TABLE_TARGET:g}× the table",
            at_most(ratio(store, table), STORE_VS_TABLE_TARGET)),
        row("clone", "clone into an empty table", "peer.pull_bundle", seconds(pull_s),
            "pg_dump -t widget | psql", seconds(dump_restore), ratio(dump_restore, pull_s),
            f"≥ {PULL_VS_DUMP_TARGET:g}× its rows/s",
            None if pull_s is None or not dump_restore else dump_restore / pull_s >= PULL_VS_DUMP_TARGET)]
    if args.rows == SMALL_CLONE_ROWS:
        judged.append(row("small_clone", f"{SMALL_CLONE_ROWS:,}-row clone end to end", "peer.pull_bundle",
                          seconds(pull_s), "pg_dump -t widget | psql", seconds(dump_restore),
                          ratio(dump_restore, pull_s), f"≤ {SMALL_CLONE_TARGET_S:g} s",
                          at_most(pull_s, SMALL_CLONE_TARGET_S)))
    judged += [
        row("incremental", f"{last.get('incremental_changed', args.changed):,} changed rows, commit + pull",
            "bundle.commit + peer.pull_bundle", seconds(incremental), target=f"≤ {INCREMENTAL_TARGET_S:g} s",
            met=at_most(incremental, INCREMENTAL_TARGET_S)),
        row("import", "bundle.import of the export", not_imported(args) if imported is None else "aquapeer import",
            seconds(imported),
            "psql restoring pg_dump -t widget", seconds(restored), ratio(imported, restored),
            f"≤ {IMPORT_VS_RESTORE_TARGET:g}× the reference",
            at_most(ratio(imported, restored), IMPORT_VS_RESTORE_TARGET)),
        row("one_row_commit", "one-row commit", "bundle.commit", seconds(one),
            target=f"< {ONE_ROW_COMMIT_TARGET_S:g} s", met=None if one is None else one < ONE_ROW_COMMIT_TARGET_S),
        row("loop_lag", "worst loop lag during the clone",
            loop_lags(last),
            f"{worst_lag:,.0f} ms" if lag else "", target=f"≤ {LOOP_LAG_TARGET_MS:g} ms",
            met=at_most(worst_lag, LOOP_LAG_TARGET_MS))]
    return judged


def report(args, rounds, judged):
    """The tables of one size: its commits, its store, the clone, the CPU of the clone, export and
    import.  Targets and verdicts come from `judged` (judge())."""
    target = {j["key"]: (j["target"], verdict(j["met"])) for j in judged}
    no_target = ("", "")
    write = best_write(rounds)
    dump, first = best(rounds, "pg_dump_s"), best(rounds, "first_commit_s")
    one, changed = best(rounds, "one_row_commit_s"), best(rounds, "changed_commit_s")
    track, status = best(rounds, "track_s"), best(rounds, "status_s")
    last = rounds[-1] if rounds else {}
    first_round = rounds[0] if rounds else {}
    hashes, floor = best(rounds, "floor_row_hashes_s"), best(rounds, "floor_write_blobs_s")

    table = Table(title=f"aquapeer bundles vs PostgreSQL on widget, {args.rows:,} rows "
                        f"(best of {plural(len(rounds), 'round')})")
    for column in ("what", "aquapeer", "s", "rows/s", "native reference", "s", "rows/s", "aquapeer/native",
                   "target", ""):
        table.add_column(column)
    table.add_row("whole table", "bundle.commit, the first", fmt(first), fmt(per_s(args.rows, first), 0),
                  "CREATE TABLE AS + primary key", fmt(write), fmt(per_s(args.rows, write), 0),
                  fmt(ratio(first, write)), *target["first_commit"])
    table.add_row("", "", "", "", "pg_dump -t widget > /dev/null", fmt(dump), fmt(per_s(args.rows, dump), 0),
                  fmt(ratio(first, dump)), *no_target)
    table.add_row("", "its floor: every row's key, text, their SHA-256s", fmt(hashes), "", "", "", "",
                  fmt(ratio(hashes, write)), *no_target)
    table.add_row("", "its floor: the same, each row written once in its bucket", fmt(floor), "", "", "", "",
                  fmt(ratio(floor, write)), *no_target)
    table.add_row("", "bundle.track (before it)", fmt(track, 3), "", "", "", "", "", *no_target)
    table.add_row("one changed row", "bundle.status", fmt(status, 3), "", "", "", "", "", *no_target)
    table.add_row("", "bundle.commit", fmt(one, 3), "", "", "", "", "", *target["one_row_commit"])
    added = last.get("one_row_added")
    table.add_row("", "storage rows added", ", ".join(f"{t} +{n}" for t, n in added.items()) if added else "",
                  "", "", "", "", "", "a handful", "")
    table.add_row(f"{last.get('changed', args.changed):,} changed rows", "bundle.commit", fmt(changed, 3),
                  fmt(per_s(last.get("changed", args.changed), changed), 0), "", "", "", "", *no_target)
    console.print(table)

    s = first_round.get("sizes")
    if s:
        table = Table(title=f"storage right after the first commit of the first round, {args.rows:,} rows, MB "
                            "(heap, indexes and TOAST)")
        for column in ("public.widget", *(f"bundle.{t}" for t in STORAGE_TABLES), "bundle, total", "bundle/widget",
                       "target", ""):
            table.add_column(column)
        total = sum(s[t] for t in STORAGE_TABLES)
        table.add_row(fmt(mb(s["widget"]), 1), *(fmt(mb(s[t]), 1) for t in STORAGE_TABLES), fmt(mb(total), 1),
                      fmt(total / s["widget"]), *target["store"])
        table.caption = ("bundle.object holds every commit's objects: buckets (with their rows), fan nodes, roots, "
                         "commits")
        console.print(table)

    dump_restore, pull_s = best(rounds, "dump_restore_s"), best(rounds, "pull_s")
    incremental = best(rounds, "incremental_s")
    table = Table(title=f"between two clusters, {args.rows:,} rows")
    for column in ("what", "aquapeer", "s", "rows/s", "native reference", "s", "rows/s", "aquapeer/native",
                   "target", ""):
        table.add_column(column)
    table.add_row("whole bundle into an empty table", "peer.pull_bundle", fmt(pull_s),
                  fmt(per_s(args.rows, pull_s), 0), "pg_dump -t widget | psql", fmt(dump_restore),
                  fmt(per_s(args.rows, dump_restore), 0), fmt(ratio(dump_restore, pull_s)), *target["clone"])
    if "small_clone" in target:
        table.add_row("", "end to end", fmt(pull_s), "", "", "", "", "", *target["small_clone"])
    if last.get("pull_fetch_s") is not None:
        table.add_row("", "of which fetching and keeping", fmt(last["pull_fetch_s"]), "", "", "", "", "", *no_target)
    if last.get("pull_checkout_s") is not None:
        table.add_row("", "of which checking out", fmt(last["pull_checkout_s"]), "", "", "", "", "", *no_target)
    if last.get("pull_loop_lag_ms"):
        table.add_row("", "worst loop lag", loop_lags(last), "", "", "", "", "", *target["loop_lag"])
    if last.get("pull_bytes"):
        table.add_row("", "on the wire", f"{mb(last['pull_bytes']):,.1f} MB", "",
                      "objects kept", f"{mb(last['pull_object_bytes']):,.1f} MB", "",
                      f"compressed {last['pull_object_bytes'] / last['pull_bytes']:.1f}×", *no_target)
    table.add_row(f"{last.get('incremental_changed', args.changed):,} changed rows",
                  "commit + peer.pull_bundle", fmt(incremental, 3), "", "", "", "", "", *target["incremental"])
    table.add_row("", "the same, the first after the clone", fmt(best(rounds, "incremental_after_clone_s"), 3),
                  "", "", "", "", "", *no_target)
    if last.get("incremental_fetch_s") is not None:
        table.add_row("", "of which fetching and keeping", fmt(last["incremental_fetch_s"], 3),
                      "", "", "", "", "", *no_target)
    if last.get("incremental_bytes") is not None:
        table.add_row("", "on the wire", f"{last['incremental_bytes'] / 2**10:,.1f} KB", "", "", "", "", "",
                      *no_target)
    table.caption = ("the worst loop lag: the worst second peer.worker_status() kept during the clone; "
                     "\"≤\" where the minute before it was as bad")
    console.print(table)

    if last.get("pull_cpu_s"):
        report_cpu(args, last)
    report_import(args, rounds, target)


# Processes of the clone first, in this order; the others by the CPU they took.
CPU_ORDER = ("aquapeer worker", PULLER, "aquapeer executor")
CPU_SHOWN_S = 0.05  # processes of other kinds that took less are summed in one line


def report_cpu(args, last):
    """The CPU seconds every process of each cluster took during the clone (of the last round)."""
    pull_s, spent = last["pull_s"], last["pull_cpu_s"]
    table = Table(title=f"CPU during the clone of {args.rows:,} rows ({pull_s:,.1f} s, the last round), "
                        f"{os.cpu_count()} cores")
    for column in ("cluster", "process", "processes", "CPU s", "each, s", "cores busy (CPU s / clone s)"):
        table.add_column(column)
    clusters_s = 0.0
    for who, by_label in spent.items():
        rest = {label: each for label, each in by_label.items()
                if label not in CPU_ORDER and label != ProcessCpu.ENDED and sum(each) < CPU_SHOWN_S}
        shown = [label for label in CPU_ORDER if label in by_label]
        shown += sorted((label for label in by_label if label not in (*CPU_ORDER, ProcessCpu.ENDED, *rest)),
                        key=lambda label: -sum(by_label[label]))
        for label in shown:
            each = by_label[label]
            many = len(each) > 1 and label != "postmaster"
            table.add_row(who, label, str(len(each)), fmt(sum(each), 1),
                          ", ".join(fmt(s, 1) for s in each[:8]) + (", …" if len(each) > 8 else "") if many else "",
                          fmt(sum(each) / pull_s))
            who = ""
        if rest:
            table.add_row(who, f"other kinds, each under {CPU_SHOWN_S:g} s", str(sum(map(len, rest.values()))),
                          fmt(sum(sum(each) for each in rest.values()), 1), "", "")
        table.add_row("", ProcessCpu.ENDED, "", fmt(by_label[ProcessCpu.ENDED][0], 1), "", "")
        total = sum(sum(each) for each in by_label.values())
        clusters_s += total
        table.add_row("", "[bold]the cluster in all[/]", "", f"[bold]{fmt(total, 1)}[/]", "", fmt(total / pull_s))
    machine = last["pull_machine_cpu_s"]
    table.add_row("the machine", "everything", "", fmt(machine, 1), "", fmt(machine / pull_s))
    table.add_row("", "of which neither cluster", "", fmt(machine - clusters_s, 1), "", "")
    table.caption = ("the processes of each cluster sampled every 0.1 s from pg_stat_activity and /proc; the "
                     "machine's includes whatever else ran on it meanwhile")
    console.print(table)


def not_imported(args):
    return f"not measured: over --import-rows {args.import_rows:,}" if import_capped(args) else "failed"


def report_import(args, rounds, target):
    """aquapeer export and import against pg_dump to a file and psql restoring it."""
    imported = best(rounds, "import_s")
    if imported is None:
        console.print(f"export and import, {args.rows:,} rows: {not_imported(args)}")
        return
    table = Table(title=f"export and import, {args.rows:,} rows (best of {plural(len(rounds), 'round')})")
    for column in ("what", "aquapeer", "s", "MB", "native reference", "s", "MB", "aquapeer/native", "target", ""):
        table.add_column(column)
    last = rounds[-1]
    export, dump, restore = best(rounds, "export_s"), best(rounds, "dump_file_s"), best(rounds, "restore_s")
    checkout = best(rounds, "import_checkout_s")
    table.add_row("the bundle to a file", "aquapeer export", fmt(export), fmt(mb(last.get("export_bytes")), 1),
                  "pg_dump -t widget -f", fmt(dump), fmt(mb(last.get("dump_bytes")), 1), fmt(ratio(export, dump)),
                  "", "")
    table.add_row("into a fresh database", "aquapeer import", fmt(imported), "", "psql -f (the dump)", fmt(restore),
                  "", fmt(ratio(imported, restore)), *target["import"])
    table.add_row("", "bundle.checkout after it", fmt(checkout), "", "", "", "", "", "", "")
    table.add_row("", "import + checkout", fmt(None if checkout is None else imported + checkout), "", "", "", "",
                  fmt(ratio(None if checkout is None else imported + checkout, restore)), "", "")
    table.caption = "the export holds every commit of the bundle: the first, the one row and the changed rows"
    console.print(table)


def report_targets(measured):
    """Issue 21's table: every target, at each size side by side."""
    table = Table(title="issue 21's targets, each beside its reference in the same run")
    for column in ("what", "rows", "aquapeer", "", "native reference", "", "ratio", "target", ""):
        table.add_column(column)
    keys = []  # in the order judge() gives them, also those only some sizes have
    for size in measured:
        place = -1
        for j in size["judged"]:
            if j["key"] in keys:
                place = keys.index(j["key"])
            else:
                place += 1
                keys.insert(place, j["key"])
    for key in keys:
        what = True
        for size in measured:
            for j in size["judged"]:
                if j["key"] == key:
                    table.add_row(j["what"] if what else "", f"{size['rows']:,}", j["aquapeer"], j["value"],
                                  j["reference"], j["reference_value"], fmt(j["ratio"]), j["target"],
                                  verdict(j["met"]))
                    what = False
    console.print(table)


def rows_list(text):
    """--rows: sizes separated by commas."""
    counts = [int(n) for n in text.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give row counts of at least 1, separated by commas")
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=rows_list, default=[1_000_000, SMALL_CLONE_ROWS], metavar="N[,N...]",
                        help="sizes of the widget table, each measured in turn (default: 1000000,50000)")
    parser.add_argument("--changed", type=int, default=1000,
                        help="rows changed for the commit of many rows (default: 1000)")
    parser.add_argument("--import-rows", type=int, default=None, metavar="N",
                        help="measure export and import only at sizes up to N rows (default: at every size)")
    parser.add_argument("--rounds", type=int, default=1, help="run everything this many times (default: 1)")
    parser.add_argument("--conf", action="append", default=[], metavar="NAME=VALUE",
                        help="a server setting beyond the test bed's (repeatable), e.g. shared_buffers=1GB")
    parser.add_argument("--json", action="store_true", help="print the figures as one line of JSON too")
    args = parser.parse_args()
    if min(args.rows) < args.changed or args.changed < 1 or args.rounds < 1:
        parser.error("need 1 <= --changed <= each of --rows and --rounds >= 1")
    conf = dict(c.split("=", 1) for c in args.conf)

    measured, errors = [], {}
    signal_server = tb.SignalServer().start()
    try:
        with tb.Testbed(2, names=["alice", "bob"], extra_conf=conf) as bed:
            for cluster in bed:
                tb.join_signaling(cluster, signal_server.url)
            tb.befriend(bed.alice, "alice", bed.bob, "bob")
            create_widget_table(bed.bob)
            for rows in args.rows:
                size = copy.copy(args)
                size.rows = rows
                _, loaded_s = timed(lambda: load_widgets(bed.alice, rows))  # noqa: B023 - called at once
                console.print(f"loaded {rows:,} widgets in {loaded_s:.1f} s: "
                              f"{bed.alice.scalar('select pg_size_pretty(pg_table_size(%s))', 'public.widget')} "
                              f"(table without indexes); server settings beyond the test bed's: {conf or 'none'}")
                rounds = []
                for n in range(args.rounds):
                    figures = {}
                    rounds.append(figures)
                    for name, part in PARTS:
                        try:
                            part(bed, size, figures)
                        except Exception as e:  # noqa: BLE001 - reported with the other figures
                            errors[f"{rows:,} rows, round {n + 1}, {name}"] = f"{e!r}"
                            console.print(traceback.format_exc())
                judged = judge(size, rounds)
                report(size, rounds, judged)
                measured.append({"rows": rows, "rounds": rounds, "judged": judged})
    finally:
        signal_server.stop()

    report_targets(measured)
    for part, message in errors.items():
        console.print(f"[bold red]failed: {part}:[/] {message}")
    if args.json:
        print(json.dumps({"changed": args.changed, "import_rows": args.import_rows, "sizes": measured,
                          "errors": errors or None}, default=str), flush=True)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
