#!/usr/bin/env python3
"""aquapeer demo: two throwaway PostgreSQL clusters, alice and bob, each with
the extension preloaded, shown step by step.

    make demo                       # = .venv/bin/python scripts/demo.py
    python scripts/demo.py --clusters-only   # only the cluster part

Steps (each a method of Demo, run in the order of Demo.STEPS):
  1. start alice and bob (shared_preload_libraries = 'aquapeer')
  2. CREATE EXTENSION aquapeer CASCADE in each
  3. wait until peer.worker_status() says 'running'
  4. show peer.worker_status() of each
  5. peer.ping_worker() round trip of each
  6. start `aquapeer signal`; each database registers there
  7. alice and bob befriend each other with invites
  8. alice: select peer.connect('bob')
  9. peer.connections on both sides
 10. messages both ways (peer.send, peer.inbox, peer.outbox), one refused
 11. alice calls a function bob exposed (peer.call), and one he did not
 12. alice commits a bundle of 50,000 rows and shares it with bob
 13. bob pulls it with `aquapeer pull` (a progress bar), then alice's next commit
 14. both change the bundle; bob's pull merges, with one conflict he resolves
and finally everything is torn down (also on error or Ctrl-C).
To extend the demo, add a method and its name to STEPS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import psycopg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.panel import Panel  # noqa: E402
from rich.table import Table  # noqa: E402

import testbed as tb  # noqa: E402

console = Console(highlight=False)


class StepFailed(Exception):
    pass


class Demo:
    #: the steps, in order; the ones in EXTENSION_STEPS need aquapeer
    STEPS = ["show_clusters", "create_extension", "wait_workers_running",
             "show_worker_status", "ping_workers", "join_signaling", "befriend", "connect",
             "show_connections", "send_messages", "remote_call", "bundle_commit", "bundle_pull",
             "bundle_merge"]
    EXTENSION_STEPS = set(STEPS) - {"show_clusters"}

    def __init__(self, bed: tb.Testbed, args: argparse.Namespace):
        self.bed = bed
        self.args = args
        self.n = 0
        self.signal = None

    # ---- helpers ----

    @contextlib.contextmanager
    def step(self, title: str):
        self.n += 1
        console.rule(f"[bold cyan]Step {self.n}[/]: {title}", align="left")
        t0 = time.monotonic()
        try:
            yield
        except psycopg.Error as exc:
            console.print(f"[red]✗ {title}: {type(exc).__name__}: {exc}[/]")
            raise StepFailed(title) from exc
        console.print(f"[green]✓[/] {title} [dim]({time.monotonic() - t0:.2f} s)[/]")

    @staticmethod
    def query(cluster, query: str, *params) -> tuple[list[str], list[tuple]]:
        """Column names and rows of a query."""
        with cluster.connect() as conn:
            cur = conn.execute(query, params or None)
            cols = [d.name for d in cur.description] if cur.description else []
            return cols, (cur.fetchall() if cur.description else [])

    def table(self, title: str, per_cluster: dict) -> Table:
        """Query results side by side: one row per column of the query, one
        column per cluster (fits a narrow terminal; results of one row each
        are the common case; further rows get their own columns)."""
        t = Table(title=title, title_justify="left")
        t.add_column("", style="bold")
        fields: list[str] = []
        columns = []
        for name, (cols, rows) in per_cluster.items():
            for c in cols:
                if c not in fields:
                    fields.append(c)
            for i, row in enumerate(rows or [()]):
                t.add_column(name if len(rows) <= 1 else f"{name} #{i + 1}", overflow="fold")
                columns.append(dict(zip(cols, row, strict=False)))  # () when a cluster has no rows
        for f in fields:
            t.add_row(f, *(self.fmt(col.get(f)) for col in columns))
        return t

    @staticmethod
    def fmt(value) -> str:
        if value is None:
            return ""
        if hasattr(value, "total_seconds"):
            return f"{value.total_seconds() * 1000:.3f} ms"
        if hasattr(value, "isoformat"):
            return value.isoformat(sep=" ", timespec="seconds") \
                if hasattr(value, "hour") else value.isoformat()
        return str(value)

    # ---- the steps ----

    def show_clusters(self):
        with self.step("start the clusters"):
            q = ("select %s::int as port, %s as socket_dir, pg_backend_pid() as backend_pid,"
                 " split_part(current_setting('server_version'), ' ', 1) as version,"
                 " current_setting('shared_preload_libraries') as preload")
            console.print(self.table("clusters", {
                c.name: self.query(c, q, c.port, c.sock_dir) for c in self.bed}))
            for c in self.bed:
                console.print(f"  {c.name}: postmaster pid {c.postmaster_pid()}, "
                              f"log {c.log_path}")

    def create_extension(self):
        with self.step("CREATE EXTENSION aquapeer CASCADE on each"):
            for c in self.bed:
                c.sql("CREATE EXTENSION IF NOT EXISTS aquapeer CASCADE")
                version = c.scalar("select extversion from pg_extension "
                                   "where extname = 'aquapeer'")
                console.print(f"  {c.name}: aquapeer {version}")

    def wait_workers_running(self):
        timeout = self.args.timeout
        with self.step(f"wait until each worker is running (up to {timeout:g} s)"):
            for c in self.bed:
                t0 = time.monotonic()
                try:
                    tb.wait_for(lambda c=c: c.scalar("select state from peer.worker_status()")
                                == "running", timeout, interval=0.1,
                                message=f"{c.name}'s worker")
                except TimeoutError as exc:
                    state = c.scalar("select state from peer.worker_status()")
                    console.print(f"[red]  {c.name}: {exc}; state is {state!r}[/]")
                    console.print(c.log()[-3000:], markup=False)
                    raise StepFailed("worker not running") from exc
                console.print(f"  {c.name}: running after {time.monotonic() - t0:.2f} s")

    def show_worker_status(self):
        with self.step("peer.worker_status()"):
            results = {c.name: self.query(c, "select * from peer.worker_status()")
                       for c in self.bed}
            console.print(self.table("peer.worker_status()", results))

    def ping_workers(self):
        with self.step("peer.ping_worker(): round trip backend → worker → backend"):
            console.print(self.table("peer.ping_worker()", {
                c.name: self.query(c, "select peer.ping_worker() as round_trip")
                for c in self.bed}))

    def join_signaling(self):
        with self.step("start a signaling server; each database registers there"):
            self.signal = tb.SignalServer().start()
            for c in self.bed:
                tb.join_signaling(c, self.signal.url)
            console.print(self.table("peer.whoami()", {
                c.name: self.query(c, "select peer.whoami() as peer_id, "
                                      "(select url from peer.signal_server) as signaling")
                for c in self.bed}))

    def befriend(self):
        with self.step("alice and bob exchange invites: peer.add_friend(name, peer.invite())"):
            alice, bob = self.bed.alice, self.bed.bob
            console.print(f"  bob's invite: {bob.scalar('select peer.invite()')[:72]}…")
            tb.befriend(alice, "alice", bob, "bob")
            console.print(self.table("peer.friends", {
                c.name: self.query(c, "select name, peer_id, state, role from peer.friends")
                for c in self.bed}))

    def connect(self):
        with self.step("alice: select peer.connect('bob')  (WebRTC data channel, identities checked)"):
            t0 = time.monotonic()
            result = self.bed.alice.scalar("select peer.connect('bob')")
            console.print(f"  {result} in {(time.monotonic() - t0) * 1000:.0f} ms")

    def show_connections(self):
        with self.step("peer.connections on both sides"):
            tb.wait_for(lambda: self.bed.bob.scalar(
                "select count(*) from peer.connections where state = 'connected'") == 1, 10)
            time.sleep(2.5)  # one application ping each way, for rtt_ms
            console.print(self.table("peer.connections", {
                c.name: self.query(c, "select * from peer.connections") for c in self.bed}))

    def send_messages(self):
        with self.step("messages both ways: peer.allow_topic, then peer.send in one transaction each"):
            alice, bob = self.bed.alice, self.bed.bob
            alice.sql("select peer.allow_topic('chat', 'bob')")
            bob.sql("select peer.allow_topic('chat', 'alice')")
            alice.sql("""select peer.send('bob', 'chat', jsonb_build_object('text', t))
                         from unnest(array['hi bob', 'how is the widget table?']) t""")
            bob.sql("""select peer.send('alice', 'chat', '{"text": "hi alice, all good"}')""")
            alice.sql("""select peer.send('bob', 'secret', '{"text": "bob never allowed this topic"}')""")
            for cluster, expected in ((bob, 2), (alice, 1)):
                tb.wait_for(lambda cluster=cluster, expected=expected:
                            cluster.scalar("select count(*) from peer.inbox") >= expected, 15)
            tb.wait_for(lambda: alice.scalar("select count(*) from peer.outbox where state = 'queued'") == 0, 15)
            console.print(self.table("peer.inbox: what arrived", {
                c.name: self.query(c, "select friend, topic, payload, received_at - sent_at as took "
                                      "from peer.inbox order by position") for c in self.bed}))
            console.print(self.table("peer.outbox: what the friend acknowledged or refused", {
                c.name: self.query(c, "select friend, topic, state, reason from peer.outbox order by seq")
                for c in self.bed}))

    def remote_call(self):
        with self.step("alice: select peer.call('bob', 'public.price_of', '{\"sku\": \"w-1\"}')"):
            alice, bob = self.bed.alice, self.bed.bob
            bob.sql("""create or replace function public.price_of(item jsonb) returns jsonb language sql as $$
                         select jsonb_build_object('sku', item->>'sku', 'price', 42.50,
                                                   'served_by', current_user) $$""")
            bob.sql("select peer.expose('public.price_of(jsonb)'::regprocedure, 'alice')")
            with alice.connect() as conn:
                conn.execute("""select peer.call('bob', 'public.price_of', '{"sku": "w-0"}')""")  # warm
                t0 = time.monotonic()
                result = conn.execute("""select peer.call('bob', 'public.price_of', '{"sku": "w-1"}')""").fetchone()[0]
            console.print(f"  bob answered {result} in {(time.monotonic() - t0) * 1000:.1f} ms")
            try:
                alice.sql("select peer.call('bob', 'public.secret_of', '{}')")
            except Exception as exc:  # the refusal is the point
                console.print(f"  a function bob did not expose: [yellow]{str(exc).splitlines()[0]}[/]")

    WIDGETS = """create table public.widget (id int primary key, name text, price numeric, tags text[],
                                                meta jsonb, updated timestamptz)"""

    def bundle_commit(self):
        with self.step("alice: bundle.create('widgets'), bundle.track, bundle.commit; peer.share_bundle with bob"):
            alice, bob = self.bed.alice, self.bed.bob
            for cluster in (alice, bob):
                cluster.sql(self.WIDGETS)
            alice.sql("""insert into public.widget select n, 'widget ' || n, n * 0.25, array['red', 'size-' || n % 5],
                                 jsonb_build_object('batch', n / 1000), now() from generate_series(1, 50000) n""")
            alice.sql("select bundle.create('widgets'); select bundle.track('widgets', 'public.widget')")
            t0 = time.monotonic()
            commit = alice.scalar("select bundle.commit('widgets', 'the first 50,000 widgets')")
            console.print(f"  commit {commit[:12]}… of 50,000 rows in {time.monotonic() - t0:.2f} s")
            alice.sql("select peer.share_bundle('widgets', 'bob')")

    def bundle_pull(self):
        with self.step("bob: aquapeer pull alice widgets  (= select peer.pull_bundle('alice', 'widgets'))"):
            alice, bob = self.bed.alice, self.bed.bob
            cli = Path(os.environ.get("AQUAPEER_BINDIR") or "/usr/local/bin") / "aquapeer"
            done = subprocess.run([str(cli), "pull", "--dbname", bob.dsn, "alice", "widgets"], timeout=300)
            if done.returncode != 0:
                raise StepFailed("aquapeer pull")
            alice.sql("update public.widget set price = price * 1.1 where id <= 1000")
            alice.sql("select bundle.commit('widgets', 'prices up 10% for the first 1,000')")
            t0 = time.monotonic()
            summary = json.loads(bob.scalar("select peer.pull_bundle('alice', 'widgets')::text"))
            console.print(f"  the next commit: {summary['blobs']} rows, {summary['bytes']:,} bytes on the wire, "
                          f"fast-forward {summary['fast_forward']}, {time.monotonic() - t0:.2f} s")
            console.print(self.table("bundle.log('widgets')", {
                c.name: self.query(c, "select left(commit_id, 12) as commit, message, rows_changed "
                                      "from bundle.log('widgets')") for c in self.bed}))

    def bundle_merge(self):
        with self.step("both change widget 7; bob pulls: a three-way merge, one conflict, resolved"):
            alice, bob = self.bed.alice, self.bed.bob
            alice.sql("update public.widget set name = 'alice''s widget', price = 1 where id = 7")
            alice.sql("select bundle.commit('widgets', 'alice renames and reprices widget 7')")
            bob.sql("update public.widget set price = 2, tags = '{blue}' where id = 7")
            bob.sql("select bundle.commit('widgets', 'bob reprices and retags widget 7')")
            summary = json.loads(bob.scalar("select peer.pull_bundle('alice', 'widgets')::text"))
            console.print(f"  merge: fast-forward {summary['fast_forward']}, conflicts {summary['conflicts']}")
            console.print(self.table("bob: bundle.conflicts", {
                "bob": self.query(bob, 'select relation, key, column_name, base, ours, theirs from bundle.conflicts')}))
            bob.sql("""select bundle.resolve('widgets', 'public.widget', '["7"]', 'price', 'theirs')""")
            bob.sql("select bundle.commit('widgets', 'merge alice''s widgets')")
            console.print(self.table("bob: widget 7 after the merge", {
                "bob": self.query(bob, "select name, price, tags from public.widget where id = 7")}))

    def run(self) -> None:
        for name in self.STEPS:
            if self.args.clusters_only and name in self.EXTENSION_STEPS:
                continue
            getattr(self, name)()

    def close(self) -> None:
        if self.signal is not None:
            self.signal.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters-only", action="store_true",
                    help="only start and show the clusters (no extension needed)")
    ap.add_argument("--timeout", type=float, default=20,
                    help="seconds to wait for the workers (default 20)")
    args = ap.parse_args(argv)

    preload = not args.clusters_only
    console.print(Panel.fit(
        "[bold]aquapeer demo[/]: PostgreSQL databases talking peer to peer\n"
        f"clusters alice and bob, extension {'preloaded' if preload else 'NOT loaded'}",
        border_style="cyan"))
    status = 0
    base = None
    try:
        with console.status("initdb + start alice and bob ..."):
            bed = tb.Testbed(names=["alice", "bob"], preload=preload).__enter__()
        base = bed.base_dir
        demo = Demo(bed, args)
        try:
            demo.run()
        except StepFailed:
            status = 1
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            status = 130
        finally:
            with console.status("tearing down ..."):
                demo.close()
                bed.close()
    except tb.ExtensionNotInstalled as exc:
        console.print(Panel(str(exc), title="aquapeer is not installed", border_style="red"))
        return 1
    except tb.TestbedError as exc:
        console.print(Panel(str(exc), title="could not start the clusters", border_style="red"))
        return 1
    console.print(f"[green]clusters torn down[/] ({base} removed)" if status == 0
                  else f"[yellow]clusters torn down[/] ({base} removed); demo failed")
    return status


if __name__ == "__main__":
    sys.exit(main())
