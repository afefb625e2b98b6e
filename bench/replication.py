"""Benchmark live row replication (peer.publish / peer.subscribe) against PostgreSQL's logical replication.

Run with `.venv/bin/python bench/replication.py` (`--only native` or `--only aquapeer,latency` for a
part alone; `--rows 50000 --seconds 5` for a quick run).  Two real clusters on loopback, alice
(A, the publisher) and bob (B, the subscriber), both with wal_level = logical, and on both the table

    item(id int primary key, n int not null, payload text not null)   -- payload: 100 bytes

filled with the same --rows rows (default 200,000) before each side starts: native logical
replication first (CREATE PUBLICATION on A, CREATE SUBSCRIPTION on B over A's loopback TCP address,
copy_data = false), its subscription dropped (and its slot with it) before the aquapeer side; then
aquapeer (the real signaling server, `aquapeer signal`, the two databases friends and connected,
`peer.publish('public.item', 'bob')` on A, `peer.subscribe('public.item', 'alice', initial => false)`
on B, B's friend role for alice a LOGIN role with SELECT, INSERT, UPDATE, DELETE on item).  Each
side measures, on freshly filled tables (vacuumed, analyzed, checkpointed):

- writes (first, on the table not yet published): single-row UPDATE transactions per second on A,
  pgbench for --seconds from 1 client and from --clients clients, unpublished; later the same
  with the table published and subscribed, and how long B then took to catch up.  Target: at
  least 0.6 times unpublished (aquapeer's published over aquapeer's unpublished, the native
  ratio beside it);
- bulk: one UPDATE of all --rows rows on A (`update item set n = <new value>`), from its COMMIT
  being sent until B has all of it (B polled: count(*) where n = <new value>).  Target: aquapeer
  at least 0.5 times as fast as native;
- latency: --latency-samples single-row UPDATE transactions, --rate a second, from COMMIT
  returning on A to a LISTEN session on B receiving the NOTIFY of an `ENABLE ALWAYS` trigger on
  B's item carrying the row's id (the native apply worker runs with session_replication_role =
  replica, aquapeer applies as a normal session: the one trigger fires for both).  Target:
  aquapeer p50 < 20 ms, p99 < 100 ms;
- catch-up: B's cluster stopped (pg_ctl stop -m fast; the native slot stays on A), --changes
  single-row UPDATE statements made on A, --per-transaction of them a transaction, B started
  again: from its start until it has them all.  Target: aquapeer at most 2 times native;
- CPU seconds of every process of both clusters during each part, sampled from pg_stat_activity
  and /proc: the aquapeer workers and executors (native: walsender and apply worker), and the
  worst loop lag the aquapeer workers report (peer.worker_status().loop_lag_max_ms) meanwhile.

The sessions writing on A use synchronous_commit = on (--sender-synchronous-commit; pgbench through
PGOPTIONS): the test bed turns it off cluster-wide, and a logical walsender sends only flushed WAL.
Between parts a barrier (row 1's n set to a fresh negative value on A, awaited on B) shows that B
has applied everything before it; when a part fails and the barrier then fails too, the side's
remaining parts are skipped.

The figures are printed as rich tables, then (with --json) as one line of JSON.  The exit status is
1 when a part failed (could not be measured), with the part and the reason printed at the end; a
missed target is shown as missed but does not fail the run.
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import psycopg
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import testbed as tb  # noqa: E402
from measure import percentiles  # noqa: E402
from procinfo import cpu_seconds  # noqa: E402

console = Console(width=150)

BULK_TARGET = 0.5             # aquapeer's speed over native's, at least
LATENCY_P50_TARGET_MS = 20.0
LATENCY_P99_TARGET_MS = 100.0
WRITE_COST_TARGET = 0.6       # published tps over unpublished tps, at least
CATCHUP_TARGET = 2.0          # aquapeer's time over native's, at most
LOOP_LAG_TARGET_MS = 100.0    # as in bench_worker.py

SIDES = ("native", "aquapeer")
PARTS = ("writes", "bulk", "latency", "catchup")
LATENCY_WARMUP = 10
CHANNEL = "bench_item"
PAYLOAD_BYTES = 100
BULK_VALUE = 1_000_000        # n of every row after the bulk update
CATCHUP_VALUE = 2_000_000     # n of the rows the catch-up part changed
FRIEND_ROLE = "bench_repl"
NATIVE_PUB, NATIVE_SUB = "bench_item_pub", "bench_item_sub"

PGBENCH_SCRIPT = """\\set id random(1, :rows)
update public.item set n = n + 1 where id = :id;
"""


# --- small helpers -----------------------------------------------------------------------

def log_tail(cluster, lines=30):
    return "\n".join(cluster.log().splitlines()[-lines:])


class PartFailed(RuntimeError):
    """A part could not be measured; the message says why."""


def short(e):
    """An exception as its type and the first line of its message (psycopg's are long)."""
    if isinstance(e, PartFailed):
        return str(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def writer(cluster, args, autocommit=True):
    """A session on the publisher under --sender-synchronous-commit."""
    conn = cluster.connect(autocommit=autocommit)
    conn.execute("select set_config('synchronous_commit', %s, false)", (args.sender_synchronous_commit,))
    if not autocommit:
        conn.commit()
    return conn


class Poller:
    """One connection to a cluster for polling, reopened when the server went away (a restart)."""

    def __init__(self, cluster):
        self.cluster, self.conn, self.last_error = cluster, None, None

    def value(self, query, params=None, quiet=False):
        """The first column of the first row, or None when the server cannot be reached (with
        quiet, also when the query fails)."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = self.cluster.connect()
            return self.conn.execute(query, params).fetchone()[0]
        except psycopg.OperationalError as e:
            self.last_error = e
            self.close()
            return None
        except psycopg.Error:
            if not quiet:
                raise
            return None

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None


def wait_until(poller, query, params, done, timeout, interval, what, explain):
    """Poll `query` until done(value); returns time.perf_counter() when it was seen done.
    On timeout raises PartFailed with the last value and explain()'s account of the replication."""
    deadline = time.perf_counter() + timeout
    value = None
    while True:
        value = poller.value(query, params)
        now = time.perf_counter()
        if value is not None and done(value):
            return now
        if now > deadline:
            raise PartFailed(f"timed out after {timeout:g} s waiting for {what} (last seen: {value!r}"
                             f"{'' if poller.last_error is None else f', last error: {poller.last_error!r}'}); "
                             f"{explain()}")
        time.sleep(interval)


_markers = itertools.count(1)


def barrier(side, args, timeout=None):
    """Row 1's n set to a fresh negative value on A; returns the seconds until B had it."""
    marker = -next(_markers)
    with writer(side.alice, args) as conn:
        conn.execute("update public.item set n = %s where id = 1", (marker,))
    started = time.perf_counter()
    poller = Poller(side.bob)
    try:
        seen = wait_until(poller, "select n from public.item where id = 1", None, lambda v: v == marker,
                          timeout or args.timeout, 0.01, f"bob to apply a marker update (n = {marker} at id 1)",
                          side.explain)
    finally:
        poller.close()
    return seen - started


def fill_tables(alice, bob, rows):
    """The same `rows` rows in a fresh public.item on both, vacuumed, analyzed and checkpointed."""
    for c in (alice, bob):
        c.sql("drop table if exists public.item")
        c.sql("create table public.item (id int primary key, n int not null, payload text not null)")
        c.sql("insert into public.item select g, 0, left(repeat(md5(g::text), 4), %s) "
              "from generate_series(1, %s) g", PAYLOAD_BYTES, rows)
    settle(alice, bob)
    a = alice.scalar("select md5(string_agg(md5(t::text), '' order by id)) from public.item t")
    b = bob.scalar("select md5(string_agg(md5(t::text), '' order by id)) from public.item t")
    if a != b:
        raise RuntimeError("public.item differs between alice and bob right after filling it")


def settle(alice, bob):
    """Every part starts from vacuumed, analyzed tables and a fresh checkpoint on both sides."""
    for c in (alice, bob):
        c.sql("vacuum analyze public.item")
        c.sql("checkpoint")


# --- CPU and loop lag while a part runs ----------------------------------------------------

class Sampler:
    """The CPU seconds each process of both clusters spends while a block runs, sampled every
    EVERY_S from pg_stat_activity and /proc, labelled by backend_type (or by application_name
    when that names aquapeer and the backend_type does not), and, with loop_lag, the worst
    peer.worker_status().loop_lag_max_ms each worker reports meanwhile.  A process that started
    after the block did counts from 0; what one spent after its last sample, or one that came and
    went between two samples, is not counted.  Survives a cluster being restarted meanwhile."""

    EVERY_S = 0.2
    LAG_EVERY_S = 1.0

    def __init__(self, clusters, loop_lag=False):
        self.clusters, self.loop_lag = clusters, loop_lag
        self.conns = {}
        self.seen = {}  # (who, pid) -> [label, CPU s at the start (0 if started later), latest CPU s]
        self.worst_lag = {}
        self.lag_errors = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.last_lag_read = 0.0

    def _conn(self, who):
        conn = self.conns.get(who)
        if conn is None or conn.closed:
            conn = self.conns[who] = self.clusters[who].connect()
        return conn

    def _read(self, starting=False):
        read_lag = self.loop_lag and time.monotonic() - self.last_lag_read >= self.LAG_EVERY_S
        if read_lag:
            self.last_lag_read = time.monotonic()
        for who in self.clusters:
            try:
                conn = self._conn(who)
                rows = conn.execute("select pid, backend_type, application_name from pg_stat_activity "
                                    "where pid <> pg_backend_pid()").fetchall()
                for pid, backend_type, app in rows:
                    label = backend_type or "?"
                    if app and "aquapeer" in app and "aquapeer" not in label:
                        label = app
                    try:
                        cpu = cpu_seconds(pid)
                    except OSError:
                        continue
                    entry = self.seen.setdefault((who, pid), [label, cpu if starting else 0.0, cpu])
                    entry[2] = cpu
                if read_lag:
                    lag = conn.execute("select loop_lag_max_ms from peer.worker_status()").fetchone()[0]
                    self.worst_lag[who] = max(self.worst_lag.get(who) or 0.0, lag or 0.0)
            except psycopg.OperationalError:  # the cluster is down or restarting
                conn = self.conns.pop(who, None)
                if conn is not None:
                    conn.close()
            except psycopg.Error as e:
                self.lag_errors[who] = repr(e)

    def _run(self):
        while not self.done.wait(self.EVERY_S):
            self._read()

    def __enter__(self):
        self.started = time.perf_counter()
        self._read(starting=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self._read()
        self.seconds = time.perf_counter() - self.started
        for conn in self.conns.values():
            conn.close()

    def spent(self):
        """{who: {label: [CPU s of each process, most first]}}, processes that spent nothing left out."""
        out = {}
        for (who, _pid), (label, start, latest) in self.seen.items():
            if latest - start > 0:
                out.setdefault(who, {}).setdefault(label, []).append(round(latest - start, 2))
        return {who: {label: sorted(each, reverse=True) for label, each in labels.items()}
                for who, labels in out.items()}


# --- the two kinds of replication --------------------------------------------------------

class Native:
    name = "native"

    def __init__(self, alice, bob, args, workdir):
        self.alice, self.bob, self.args = alice, bob, args

    def prepare(self):
        pass

    def publish(self):
        self.alice.sql(f"create publication {NATIVE_PUB} for table public.item")
        self.bob.sql(f"create subscription {NATIVE_SUB} connection '{self.alice.tcp_dsn}' "
                     f"publication {NATIVE_PUB} with (copy_data = false)")
        tb.wait_for(lambda: self.bob.scalar("select count(*) from pg_stat_subscription "
                                            "where subname = %s and pid is not null", NATIVE_SUB) > 0,
                    30, message=f"the apply worker of {NATIVE_SUB} to start")

    def unpublish(self):
        if self.bob.is_running():
            self.bob.sql(f"drop subscription if exists {NATIVE_SUB}")  # drops its slot on alice too
        self.alice.sql(f"drop publication if exists {NATIVE_PUB}")
        slots = self.alice.sql("select slot_name from pg_replication_slots")
        if slots:
            raise RuntimeError(f"replication slots left on alice: {slots}")

    def explain(self):
        try:
            sub = self.bob.sql("select pid, received_lsn, latest_end_lsn, last_msg_receipt_time "
                               "from pg_stat_subscription where subname = %s", NATIVE_SUB)
        except psycopg.Error as e:
            sub = repr(e)
        try:
            slot = self.alice.sql("select slot_name, active, confirmed_flush_lsn, pg_current_wal_lsn() "
                                  "from pg_replication_slots")
        except psycopg.Error as e:
            slot = repr(e)
        return f"bob's pg_stat_subscription: {sub}; alice's slots: {slot}"

    def status(self):
        return {}

    def connected(self):
        return None


class Aquapeer:
    name = "aquapeer"

    def __init__(self, alice, bob, args, workdir):
        self.alice, self.bob, self.args = alice, bob, args
        self.signal_server = tb.SignalServer(log_path=os.path.join(workdir, "signal.log"))

    def prepare(self):
        alice, bob = self.alice, self.bob
        self.signal_server.start()
        tb.join_signaling(alice, self.signal_server.url)
        tb.join_signaling(bob, self.signal_server.url)
        tb.befriend(alice, "alice", bob, "bob")
        # Before PostgreSQL 16 an executor's role must be able to log in.
        bob.sql(f"create role {FRIEND_ROLE} login")
        bob.sql(f"grant select, insert, update, delete on public.item to {FRIEND_ROLE}")
        bob.sql("select peer.set_friend_role('alice', %s)", FRIEND_ROLE)
        state = alice.scalar("select peer.connect('bob', '30 s')")
        if state != "connected":
            raise RuntimeError(f"peer.connect('bob') returned {state!r}")
        tb.wait_connected(bob, "alice", 30)

    def publish(self):
        self.alice.sql("select peer.publish('public.item'::regclass, 'bob')")
        self.published = True
        self.bob.sql("select peer.subscribe('public.item'::regclass, 'alice', initial => false)")
        self.subscribed = True

    published = subscribed = False

    def unpublish(self):
        errors = []
        for done, cluster, query in (
                (self.subscribed, self.bob, "select peer.unsubscribe('public.item'::regclass, 'alice')"),
                (self.published, self.alice, "select peer.unpublish('public.item'::regclass, 'bob')")):
            try:
                if done:
                    cluster.sql(query)
            except psycopg.Error as e:
                errors.append(f"{cluster.name}: {query}: {short(e)}")
        self.signal_server.stop()
        if errors:
            raise RuntimeError("; ".join(errors))

    def status(self):
        """peer.subscriptions on bob, peer.publications on alice and the connections, as JSON."""
        out = {}
        for key, cluster, query in (
                ("subscriptions", self.bob, "select coalesce(jsonb_agg(to_jsonb(s)), '[]') from peer.subscriptions s"),
                ("publications", self.alice, "select coalesce(jsonb_agg(to_jsonb(p)), '[]') from peer.publications p"),
                ("bob_connections", self.bob, "select coalesce(jsonb_agg(jsonb_build_object("
                                              "'friend', friend, 'state', state)), '[]') from peer.connections")):
            try:
                out[key] = cluster.scalar(query)
            except psycopg.Error as e:
                out[key] = short(e)
        return out

    def connected(self):
        """Whether bob sees alice connected (None when it cannot tell)."""
        return "select exists (select from peer.connections where friend = 'alice' and state = 'connected')"

    def explain(self):
        return "; ".join(f"{k}: {json.dumps(v, default=str)}" for k, v in self.status().items())


# --- the parts ----------------------------------------------------------------------------------

def pgbench(cluster, args, clients, workdir):
    """Single-row UPDATE transactions per second on the cluster's item for --seconds."""
    script = os.path.join(workdir, "update_one.sql")
    with open(script, "w") as f:
        f.write(PGBENCH_SCRIPT)
    argv = [os.path.join(tb.pg_bindir(), "pgbench"), "-n", "-M", "prepared", "-f", script,
            "-D", f"rows={args.rows}", "-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1)),
            "-T", str(max(1, round(args.seconds))), "-h", cluster.sock_dir, "-p", str(cluster.port),
            "-U", "postgres", "postgres"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGOPTIONS"] = f"-c synchronous_commit={args.sender_synchronous_commit}"
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.seconds + 120)
    tps = re.search(r"^tps = ([0-9.]+)", proc.stdout, re.M)
    count = re.search(r"number of transactions actually processed: (\d+)", proc.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    if proc.returncode != 0 or tps is None:
        raise PartFailed(f"pgbench -c {clients} exited {proc.returncode}: {proc.stdout[-800:]}{proc.stderr[-800:]}")
    return {"tps": float(tps.group(1)), "transactions": int(count.group(1)) if count else None,
            "failed": int(failed.group(1)) if failed else None}


def writes_unpublished(side, args, figures, workdir):
    """pgbench on the table nobody subscribes to yet; then alice's rows are made bob's again."""
    out = figures.setdefault("writes", {})
    for clients in (1, args.clients):
        out[f"unpublished_{clients}"] = pgbench(side.alice, args, clients, workdir)
    side.alice.sql("update public.item set n = 0 where n <> 0")


def writes_published(side, args, figures, workdir):
    out = figures.setdefault("writes", {})
    for clients in (1, args.clients):
        run = pgbench(side.alice, args, clients, workdir)
        run["catch_up_s"] = barrier(side, args)  # from pgbench's end until bob has applied it all
        out[f"published_{clients}"] = run


def bulk(side, args, figures, workdir):
    poller = Poller(side.bob)
    try:
        with writer(side.alice, args, autocommit=False) as conn:
            started = time.perf_counter()
            conn.execute("update public.item set n = %s", (BULK_VALUE,))
            updated = time.perf_counter()
            conn.commit()
            committed = time.perf_counter()
        applied = wait_until(poller, "select count(*) from public.item where n = %s", (BULK_VALUE,),
                             lambda v: v == args.rows, args.timeout, 0.05,
                             f"bob to have all {args.rows:,} rows with n = {BULK_VALUE}", side.explain)
    finally:
        poller.close()
    figures["bulk"] = {"update_s": updated - started, "commit_s": committed - updated,
                       "applied_s": applied - updated, "rows": args.rows}


class Listener(threading.Thread):
    """LISTEN on one channel of a cluster in a thread; notes when each payload first arrives."""

    def __init__(self, cluster, channel):
        super().__init__(daemon=True)
        self.conn = cluster.connect()
        self.conn.execute(f"listen {channel}")
        self.received = {}  # payload -> time.perf_counter() when the notification was read
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stopping.is_set():
                for n in self.conn.notifies(timeout=0.2):
                    self.received.setdefault(n.payload, time.perf_counter())
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def stop(self):
        self.stopping.set()
        self.join(5)
        self.conn.close()
        if self.error is not None:
            raise RuntimeError(f"the LISTEN thread failed: {self.error!r}")


def latency(side, args, figures, workdir):
    bob = side.bob
    bob.sql(f"""
        create function public.bench_item_notify() returns trigger language plpgsql as $$
        begin perform pg_notify('{CHANNEL}', new.id::text); return null; end $$;
        create trigger bench_item_notify after update on public.item
            for each row execute function public.bench_item_notify();
        alter table public.item enable always trigger bench_item_notify""")
    try:
        listener = Listener(bob, CHANNEL)
        listener.start()
        try:
            sent = []  # (id, COMMIT returned at)
            interval = 1.0 / args.rate
            first = 2  # row 1 is the barrier's
            with writer(side.alice, args, autocommit=False) as conn:
                started = time.perf_counter()
                for i in range(LATENCY_WARMUP + args.latency_samples):
                    pause = started + i * interval - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    key = conn.execute("update public.item set n = n + 1 where id = %s returning id",
                                       (first + i,)).fetchone()[0]
                    conn.commit()
                    sent.append((str(key), time.perf_counter()))
                sending_s = time.perf_counter() - started
            measured = sent[LATENCY_WARMUP:]
            deadline = time.perf_counter() + min(args.timeout, 30.0)
            while time.perf_counter() < deadline and any(k not in listener.received for k, _ in measured):
                time.sleep(0.02)
        finally:
            listener.stop()
    finally:
        bob.sql("drop trigger bench_item_notify on public.item; drop function public.bench_item_notify()")
    latencies = [listener.received[k] - t for k, t in measured if k in listener.received]
    lost = len(measured) - len(latencies)
    figures["latency"] = {"samples": latencies, "lost": lost, "achieved_rate": (len(sent) / sending_s)}
    if lost == len(measured):
        raise PartFailed(f"none of the {len(measured)} notifications arrived on bob; {side.explain()}")


def catchup(side, args, figures, workdir):
    alice, bob = side.alice, side.bob
    changes, per_xact = args.changes, args.per_transaction
    bob.stop()
    try:
        with writer(alice, args, autocommit=False) as conn:
            started = time.perf_counter()
            with conn.cursor() as cur:
                for first in range(1, changes + 1, per_xact):
                    ids = range(first, min(changes, first + per_xact - 1) + 1)
                    cur.executemany("update public.item set n = %s where id = %s", [(CATCHUP_VALUE, i) for i in ids])
                    conn.commit()
            written_s = time.perf_counter() - started
    finally:
        starting = time.perf_counter()
        bob.start()
    ready = time.perf_counter()
    poller = Poller(bob)
    reconnected = None
    probe = side.connected()

    def applied_all(count):
        nonlocal reconnected
        if probe is not None and reconnected is None and poller.value(probe, quiet=True):
            reconnected = time.perf_counter()
        return count == changes
    try:
        applied = wait_until(poller, "select count(*) from public.item where n = %s", (CATCHUP_VALUE,),
                             applied_all, args.timeout, 0.05,
                             f"bob, started again, to have all {changes:,} changes", side.explain)
    finally:
        poller.close()
    figures["catchup"] = {"changes": changes, "per_transaction": per_xact, "written_s": written_s,
                          "start_s": ready - starting, "applied_s": applied - starting,
                          "applied_after_ready_s": applied - ready,
                          "reconnected_s": None if reconnected is None else reconnected - starting}


PART_FUNCS = {"bulk": bulk, "latency": latency, "writes": writes_published, "catchup": catchup}


# --- one side ----------------------------------------------------------------------------------

def run_side(side, args, parts, figures, errors, workdir):
    """Prepare, publish, run the parts one by one (each failure reported, the next still runs
    while a barrier shows replication still works), unpublish.  Fills `figures` as it goes."""
    alice, bob = side.alice, side.bob
    name = side.name
    try:
        fill_tables(alice, bob, args.rows)
        side.prepare()
        if "writes" in parts:
            run_part(side, f"{name} writes, unpublished", writes_unpublished, args, figures, errors, workdir)
            settle(alice, bob)
        side.publish()
        # The first change through, generously: it shows replication works at all.
        figures["first_change_s"] = barrier(side, args, timeout=max(60.0, args.timeout))
    except Exception as e:  # noqa: BLE001 - reported with the other figures
        errors[f"{name} setup"] = short(e)
        console.print(traceback.format_exc())
        dump_logs(side)
        teardown(side, errors)
        return
    for part in PARTS:
        if part not in parts:
            continue
        settle(alice, bob)
        if not run_part(side, f"{name} {part}", PART_FUNCS[part], args, figures, errors, workdir):
            try:
                barrier(side, args, timeout=30.0)
            except Exception as e:  # noqa: BLE001
                errors[f"{name} (remaining parts skipped)"] = f"replication no longer works after {part} failed: {e}"
                break
    teardown(side, errors)


def run_part(side, label, func, args, figures, errors, workdir):
    part = label.split(" ", 1)[1]
    with Sampler({"alice": side.alice, "bob": side.bob}, loop_lag=side.name == "aquapeer") as sampler:
        try:
            func(side, args, figures, workdir)
            ok = True
        except Exception as e:  # noqa: BLE001
            errors[label] = short(e)
            if not isinstance(e, PartFailed):
                console.print(traceback.format_exc())
            dump_logs(side)
            ok = False
        finally:
            if not side.bob.is_running():
                side.bob.start()
    figures.setdefault("cpu", {})[part] = {"seconds": sampler.seconds, "spent": sampler.spent()}
    if sampler.loop_lag:
        figures.setdefault("loop_lag_ms", {})[part] = dict(sampler.worst_lag)
        if sampler.lag_errors:
            figures.setdefault("loop_lag_errors", {})[part] = sampler.lag_errors
    status = side.status()
    if status:
        figures.setdefault("status", {})[part] = status
    return ok


def teardown(side, errors):
    try:
        if not side.bob.is_running():
            side.bob.start()
        side.unpublish()
    except Exception as e:  # noqa: BLE001
        errors[f"{side.name} teardown"] = short(e)


def dump_logs(side):
    for c in (side.alice, side.bob):
        console.print(f"[bold]{c.name}'s server log (tail):[/]\n{log_tail(c)}")
    server = getattr(side, "signal_server", None)
    if server is not None and server.log_path and os.path.exists(server.log_path):
        with open(server.log_path, errors="replace") as f:
            console.print(f"[bold]signaling server log (tail):[/]\n{''.join(f.readlines()[-20:])}")


# --- output ----------------------------------------------------------------------------------------

def fmt(v, digits=1):
    return "" if v is None else f"{v:,.{digits}f}"


def verdict(ok):
    return "" if ok is None else ("[green]met[/]" if ok else "[red]missed[/]")


def ratio(a, b):
    return None if a is None or not b else a / b


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def report(args, result, errors):
    native, ours = result.get("native", {}), result.get("aquapeer", {})
    r = lambda v, d=3: None if v is None else round(v, d)  # noqa: E731
    targets = {}

    table = Table(title=f"aquapeer row replication vs PostgreSQL logical replication, alice → bob on loopback "
                        f"(item: {args.rows:,} rows of ~{PAYLOAD_BYTES} B payload)")
    for column in ("what", "aquapeer", "native", "aquapeer/native", "target", ""):
        table.add_column(column)

    # bulk
    ob, nb = get(ours, "bulk", "applied_s"), get(native, "bulk", "applied_s")
    speed = ratio(nb, ob)
    targets["bulk"] = None if speed is None else speed >= BULK_TARGET
    table.add_row(f"one UPDATE of {args.rows:,} rows: COMMIT sent → all on bob, s", fmt(ob, 2), fmt(nb, 2),
                  fmt(ratio(ob, nb), 2), f"speed ≥ {BULK_TARGET:g}× native (time ≤ {1 / BULK_TARGET:g}×)",
                  verdict(targets["bulk"]))
    table.add_row("  rows applied per second", fmt(ratio(args.rows, ob), 0), fmt(ratio(args.rows, nb), 0),
                  fmt(speed, 2), "", "")
    table.add_row("  the UPDATE statement on alice, s", fmt(get(ours, "bulk", "update_s"), 2),
                  fmt(get(native, "bulk", "update_s"), 2),
                  fmt(ratio(get(ours, "bulk", "update_s"), get(native, "bulk", "update_s")), 2), "", "")
    table.add_row("  its COMMIT on alice, s", fmt(get(ours, "bulk", "commit_s"), 3),
                  fmt(get(native, "bulk", "commit_s"), 3), "", "", "")

    # latency
    ol = percentiles(ours["latency"]["samples"]) if get(ours, "latency", "samples") else (None, None)
    nl = percentiles(native["latency"]["samples"]) if get(native, "latency", "samples") else (None, None)
    targets["latency_p50"] = None if ol[0] is None else ol[0] < LATENCY_P50_TARGET_MS
    targets["latency_p99"] = None if ol[1] is None else ol[1] < LATENCY_P99_TARGET_MS
    n = len(get(ours, "latency", "samples") or get(native, "latency", "samples") or []) or args.latency_samples
    table.add_row(f"latency p50, {n:,} single-row UPDATEs at {args.rate:g}/s: COMMIT → trigger NOTIFY on bob, ms",
                  fmt(ol[0], 2), fmt(nl[0], 2), fmt(ratio(ol[0], nl[0]), 2), f"< {LATENCY_P50_TARGET_MS:g} ms",
                  verdict(targets["latency_p50"]))
    table.add_row("latency p99, ms", fmt(ol[1], 2), fmt(nl[1], 2), fmt(ratio(ol[1], nl[1]), 2),
                  f"< {LATENCY_P99_TARGET_MS:g} ms", verdict(targets["latency_p99"]))
    for label, part in (("aquapeer", ours), ("native", native)):
        lost = get(part, "latency", "lost")
        if lost:
            table.add_row(f"  [red]{label}: notifications that never arrived[/]", *(
                (str(lost), "") if label == "aquapeer" else ("", str(lost))), "", "", "")

    # writes
    for clients in (1, args.clients):
        ou, op = (get(ours, "writes", f"unpublished_{clients}", "tps"),
                  get(ours, "writes", f"published_{clients}", "tps"))
        nu, np_ = (get(native, "writes", f"unpublished_{clients}", "tps"),
                   get(native, "writes", f"published_{clients}", "tps"))
        o_cost, n_cost = ratio(op, ou), ratio(np_, nu)
        targets[f"write_cost_{clients}"] = None if o_cost is None else o_cost >= WRITE_COST_TARGET
        who = "1 client" if clients == 1 else f"{clients} clients"
        table.add_row(f"single-row UPDATEs/s on alice, {who}, {args.seconds:g} s: unpublished", fmt(ou, 0),
                      fmt(nu, 0), fmt(ratio(ou, nu), 2), "", "")
        table.add_row("  published (and subscribed)", fmt(op, 0), fmt(np_, 0), fmt(ratio(op, np_), 2), "", "")
        table.add_row("  published / unpublished", fmt(o_cost, 2), fmt(n_cost, 2), "",
                      f"≥ {WRITE_COST_TARGET:g}", verdict(targets[f"write_cost_{clients}"]))
        table.add_row("  then bob caught up within, s",
                      fmt(get(ours, "writes", f"published_{clients}", "catch_up_s"), 2),
                      fmt(get(native, "writes", f"published_{clients}", "catch_up_s"), 2), "", "", "")

    # catch-up
    oc, nc = get(ours, "catchup", "applied_s"), get(native, "catchup", "applied_s")
    targets["catchup"] = None if oc is None or nc is None else oc <= CATCHUP_TARGET * nc
    table.add_row(f"catch-up: {args.changes:,} single-row updates made while bob was stopped, "
                  "bob started → all applied, s", fmt(oc, 2), fmt(nc, 2), fmt(ratio(oc, nc), 2),
                  f"≤ {CATCHUP_TARGET:g}× native", verdict(targets["catchup"]))
    table.add_row("  of which bob's start (pg_ctl start -w), s", fmt(get(ours, "catchup", "start_s"), 2),
                  fmt(get(native, "catchup", "start_s"), 2), "", "", "")
    table.add_row("  of which until bob's worker saw alice connected again, s",
                  fmt(get(ours, "catchup", "reconnected_s"), 2), "", "", "", "")
    table.add_row(f"  the changes made on alice ({args.per_transaction:,} a transaction), s",
                  fmt(get(ours, "catchup", "written_s"), 2), fmt(get(native, "catchup", "written_s"), 2), "", "", "")
    table.add_row("first change through after subscribing, s", fmt(ours.get("first_change_s"), 3),
                  fmt(native.get("first_change_s"), 3), "", "", "")
    console.print(table)

    # CPU and loop lag
    cpu_table = Table(title=f"CPU seconds during each part, by process ({os.cpu_count()} cores for both clusters "
                            "and the client)")
    for column in ("side", "part", "part s", "cluster", "process", "CPU s", "each, s", "cores busy"):
        cpu_table.add_column(column)
    for side, figures in (("aquapeer", ours), ("native", native)):
        for part, cpu in (figures.get("cpu") or {}).items():
            first = True
            for who in ("alice", "bob"):
                for label, each in sorted(cpu["spent"].get(who, {}).items(), key=lambda kv: -sum(kv[1])):
                    if sum(each) < 0.05 and "aquapeer" not in label:
                        continue
                    cpu_table.add_row(side if first else "", part if first else "",
                                      fmt(cpu["seconds"], 1) if first else "", who, label, fmt(sum(each), 2),
                                      ", ".join(fmt(s, 2) for s in each[:8]) + (", …" if len(each) > 8 else ""),
                                      fmt(sum(each) / cpu["seconds"], 2))
                    first = False
    cpu_table.caption = ("sampled every 0.2 s from pg_stat_activity and /proc; processes under 0.05 s left out "
                         "(aquapeer's always shown); client backends include pgbench's and the benchmark's")
    if cpu_table.row_count:
        console.print(cpu_table)
    if ours.get("loop_lag_ms"):
        worst = max((lag for lags in ours["loop_lag_ms"].values() for lag in lags.values()), default=None)
        targets["loop_lag"] = None if worst is None else worst < LOOP_LAG_TARGET_MS
        console.print("aquapeer workers' worst loop lag during each part (ms): " + "; ".join(
            f"{part}: " + ", ".join(f"{who} {fmt(lag)}" for who, lag in lags.items())
            for part, lags in ours["loop_lag_ms"].items())
            + f" — target < {LOOP_LAG_TARGET_MS:g} ms: {verdict(targets['loop_lag'])} (each read of "
              "peer.worker_status() covers the minute before it)")
    if ours.get("status"):
        last = list(ours["status"].values())[-1]
        console.print(f"aquapeer at the end: {json.dumps(last, default=str)}")

    for part, message in errors.items():
        console.print(f"[bold red]failed: {part}:[/] {message}")

    summary = {"rows": args.rows, "rate_per_s": args.rate, "seconds": args.seconds, "clients": args.clients,
               "changes": args.changes, "per_transaction": args.per_transaction,
               "sender_synchronous_commit": args.sender_synchronous_commit}
    for side, figures in (("aquapeer", ours), ("native", native)):
        lat = get(figures, "latency", "samples")
        p = percentiles(lat) if lat else (None, None)
        summary[side] = {
            "bulk_applied_s": r(get(figures, "bulk", "applied_s")),
            "bulk_update_s": r(get(figures, "bulk", "update_s")),
            "bulk_commit_s": r(get(figures, "bulk", "commit_s")),
            "latency_p50_ms": r(p[0], 2), "latency_p99_ms": r(p[1], 2), "latency_samples": len(lat or []),
            "latency_lost": get(figures, "latency", "lost"),
            "writes": {k: {kk: r(vv) for kk, vv in v.items()} for k, v in (figures.get("writes") or {}).items()},
            "catchup_applied_s": r(get(figures, "catchup", "applied_s")),
            "catchup_start_s": r(get(figures, "catchup", "start_s")),
            "catchup_reconnected_s": r(get(figures, "catchup", "reconnected_s")),
            "catchup_written_s": r(get(figures, "catchup", "written_s")),
            "first_change_s": r(figures.get("first_change_s")),
            "cpu_s": {part: {"seconds": r(cpu["seconds"], 2), "spent": cpu["spent"]}
                      for part, cpu in (figures.get("cpu") or {}).items()},
        }
        if side == "aquapeer":
            summary[side]["loop_lag_ms"] = figures.get("loop_lag_ms")
            summary[side]["status"] = figures.get("status")
    summary["ratios"] = {"bulk_speed": r(speed), "catchup_time": r(ratio(oc, nc)),
                         **{f"write_cost_{side}_{c}": r(ratio(get(f, "writes", f"published_{c}", "tps"),
                                                               get(f, "writes", f"unpublished_{c}", "tps")))
                            for side, f in (("aquapeer", ours), ("native", native)) for c in (1, args.clients)}}
    summary["targets"] = targets
    summary["errors"] = errors or None
    return summary


def parse_only(parser, value):
    """--only: a comma-separated list of sides (native, aquapeer) and parts (writes, bulk, latency,
    catchup); what it leaves out of either kind runs in full."""
    if not value:
        return list(SIDES), list(PARTS)
    words = [w.strip().lower().replace("-", "").replace("_", "") for w in value.split(",") if w.strip()]
    aliases = {"write": "writes", "writecost": "writes", "update": "bulk"}
    words = [aliases.get(w, w) for w in words]
    unknown = [w for w in words if w not in SIDES and w not in PARTS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (sides: {', '.join(SIDES)}; parts: {', '.join(PARTS)})")
    sides = [s for s in SIDES if s in words] or list(SIDES)
    parts = [p for p in PARTS if p in words] or list(PARTS)
    return sides, parts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of item on both sides (default: 200000)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="single-row UPDATE transactions per second in the latency part (default: 200)")
    parser.add_argument("--latency-samples", type=int, default=2000,
                        help=f"measured UPDATEs in the latency part, after {LATENCY_WARMUP} more (default: 2000)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long pgbench runs for each write-cost figure (default: 10)")
    parser.add_argument("--clients", type=int, default=8,
                        help="the concurrent write-cost figure's clients (default: 8)")
    parser.add_argument("--changes", type=int, default=100_000,
                        help="single-row updates made while bob is stopped (default: 100000, at most --rows)")
    parser.add_argument("--per-transaction", type=int, default=1000,
                        help="of those, how many a transaction (default: 1000)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="how long to wait for bob to apply a part's changes (default: 300)")
    parser.add_argument("--sender-synchronous-commit", default="on", choices=("on", "off", "local"),
                        help="synchronous_commit of the sessions writing on alice (default: on; see above)")
    parser.add_argument("--only", metavar="PART[,PART…]", default=None,
                        help=f"run only these sides ({', '.join(SIDES)}) and/or parts ({', '.join(PARTS)}), "
                             "e.g. --only native or --only aquapeer,latency")
    parser.add_argument("--json", action="store_true", help="print the figures as one line of JSON too")
    args = parser.parse_args()
    sides, parts = parse_only(parser, args.only)
    args.changes = min(args.changes, args.rows)
    if args.rows < LATENCY_WARMUP + args.latency_samples + 2:
        parser.error("--rows must exceed --latency-samples by at least 12 (each sample updates its own row)")
    sys.setswitchinterval(0.0005)  # the LISTEN thread must not wait long for the GIL

    result, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="aqp-bench-") as workdir, \
            tb.Testbed(2, names=["alice", "bob"], extra_conf={"wal_level": "logical"}) as bed:
        for kind in (Native, Aquapeer):
            if kind.name not in sides:
                continue
            side = kind(bed.alice, bed.bob, args, workdir)
            console.print(f"[bold]{kind.name}: {', '.join(parts)}[/]")
            try:
                run_side(side, args, parts, result.setdefault(kind.name, {}), errors, workdir)
            finally:
                if isinstance(side, Aquapeer):
                    side.signal_server.stop()

    summary = report(args, result, errors)
    if args.json:
        print(json.dumps(summary, default=str), flush=True)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
