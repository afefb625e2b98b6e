"""The launcher and the worker's life cycle, end to end on real clusters.

Each test makes its own cluster (fixture ``cluster``) unless it only reads;
``aquapeer.restart_interval = 1`` wherever a restart is awaited.  Timing
assertions are only the bounds the specification states.
"""

from __future__ import annotations

import os
import re
import signal
import time

import psycopg
import pytest

import testbed as tb

WORKER = "aquapeer worker"
LAUNCHER = "aquapeer launcher"
FAST_RESTART = {"aquapeer.restart_interval": 1}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def worker_pids(cluster, dbname="postgres"):
    """Pids of the aquapeer workers connected to ``dbname``."""
    rows = cluster.sql("select pid from pg_stat_activity where backend_type = %s and datname = %s "
                       "order by pid", WORKER, dbname)
    return [r[0] for r in rows]


def all_worker_pids(cluster):
    return cluster.backend_pids(WORKER)


def pings(cluster, dbname="postgres"):
    """True when the worker of ``dbname`` answers over the control channel."""
    return cluster.scalar("select peer.ping_worker() is not null", dbname=dbname)


def wait_ping(cluster, timeout, dbname="postgres", message=None):
    """Wait until the worker of ``dbname`` answers; return its pid."""
    tb.wait_for(lambda: pings(cluster, dbname), timeout, interval=0.1,
                message=message or f"the worker of {dbname} to answer a ping",
                ignore=(psycopg.Error,))
    pids = worker_pids(cluster, dbname)
    assert len(pids) == 1, f"expected one worker in {dbname}, found {pids}"
    return pids[0]


def create_extension(cluster, dbname="postgres"):
    cluster.sql("create extension aquapeer cascade", dbname=dbname)


def process_gone(pid):
    """True when pid no longer exists (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def worker_exit_1_lines(log):
    return [line for line in log.splitlines()
            if re.search(r'background worker "aquapeer worker[^"]*" \(PID \d+\) exited with exit code 1', line)]


# --------------------------------------------------------------------------
# 1. the worker waits for CREATE EXTENSION, and goes back to waiting on DROP
# --------------------------------------------------------------------------

def test_worker_waits_for_create_extension_and_survives_drop(cluster):
    tb.wait_for(lambda: len(cluster.backend_pids(LAUNCHER)) == 1, 15,
                message="the aquapeer launcher to run")
    pid = tb.wait_for(lambda: worker_pids(cluster), 15, message="a worker waiting in postgres")[0]
    cluster.wait_for_log(rf"\[{pid}\] .*aquapeer worker waiting for CREATE EXTENSION aquapeer", 10)
    postmaster = cluster.postmaster_pid()

    create_extension(cluster)
    assert wait_ping(cluster, 10, message="ping within 10 s of CREATE EXTENSION") == pid
    assert cluster.postmaster_pid() == postmaster, "the server restarted"

    offset = cluster.log_size()
    cluster.sql("drop extension aquapeer")
    cluster.wait_for_log(rf"\[{pid}\] .*aquapeer worker waiting for CREATE EXTENSION aquapeer", 10,
                         since=offset)
    # the same process stays, waiting
    time.sleep(1.5)
    assert worker_pids(cluster) == [pid]
    assert not process_gone(pid)
    assert not worker_exit_1_lines(cluster.log(offset))

    create_extension(cluster)
    assert wait_ping(cluster, 10, message="ping within 10 s of the second CREATE EXTENSION") == pid
    assert cluster.postmaster_pid() == postmaster


# --------------------------------------------------------------------------
# 2. peer.worker_status()
# --------------------------------------------------------------------------

def test_worker_status_reports_the_running_worker(cluster):
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    with cluster.connect() as conn:
        cur = conn.execute("select * from peer.worker_status()")
        names = [d.name for d in cur.description]
        rows = cur.fetchall()
        assert len(rows) == 1
        status = dict(zip(names, rows[0], strict=True))
        version, now = conn.execute("select peer.version(), now()").fetchone()
    assert status["pid"] == pid
    assert status["state"] == "running"
    assert status["started_at"] is not None and status["started_at"] <= now
    assert re.fullmatch(r"3\.11\.\d+", status["python_version"]), status["python_version"]
    assert status["aiortc_version"] == "1.16.0"
    assert status["aquapeer_version"] == version
    lag = status["loop_lag_max_ms"]
    assert isinstance(lag, float) and 0 <= lag < 100, lag


# --------------------------------------------------------------------------
# 3. an idle worker holds no snapshot and no transaction id
# --------------------------------------------------------------------------

def test_idle_worker_holds_no_snapshot_nor_xid(cluster):
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    query = ("select backend_type, backend_xmin::text, backend_xid::text "
             "from pg_stat_activity where pid = %s")
    with cluster.connect() as conn:
        for _ in range(7):
            row = conn.execute(query, (pid,)).fetchone()
            assert row is not None, "the worker left"
            assert row[0] == WORKER
            if row[1:] != (None, None):
                # The stop poll (every 0.25 s) runs a sub-millisecond statement
                # that may be caught in flight; a held snapshot would persist.
                time.sleep(0.02)
                row = conn.execute(query, (pid,)).fetchone()
            assert row[1:] == (None, None), f"backend_xmin, backend_xid = {row[1:]}"
            time.sleep(0.25)


# --------------------------------------------------------------------------
# 4. pg_ctl stop -m fast
# --------------------------------------------------------------------------

def test_fast_shutdown_is_quick_and_clean(cluster):
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    offset = cluster.log_size()
    seconds = cluster.stop("fast")
    log = cluster.log(offset)
    # Under the worker's 5 s timers (a stop that waited for them would be a bug), with room for load.
    assert seconds < 4, f"pg_ctl stop -m fast took {seconds:.2f} s"
    assert re.search(rf"\[{pid}\] .*aquapeer worker leaving: shutdown requested", log), log
    assert not worker_exit_1_lines(log), log
    assert "terminating background worker" not in log, log


def test_fast_shutdown_right_after_create_extension_is_quick(cluster):
    # The worker is then still starting its loop, with wakes pending; it must not lose the stop.
    for _ in range(2):
        create_extension(cluster)
        seconds = cluster.stop("fast", timeout=20)
        assert seconds < 5, f"pg_ctl stop -m fast took {seconds:.2f} s"
        cluster.start()
        cluster.sql("drop extension aquapeer")


# --------------------------------------------------------------------------
# 5. an unhandled Python exception: traceback, exit 1, restart
# --------------------------------------------------------------------------

@pytest.mark.testbed(extra_conf=FAST_RESTART)
def test_python_exception_is_logged_and_the_worker_restarts(cluster):
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    offset = cluster.log_size()
    cluster.sql("create or replace function peer._should_stop() returns text "
                "language sql as $$ select (1/0)::text $$")
    cluster.wait_for_log(rf'background worker "aquapeer worker[^"]*" \(PID {pid}\) exited with exit code 1',
                         10, since=offset)
    log = cluster.log(offset)
    assert re.search(rf"\[{pid}\] .*ERROR: .*division by zero", log), log
    assert "Traceback" in log, log

    cluster.sql("create or replace function peer._should_stop() returns text "
                "language c as 'aquapeer', 'aquapeer_should_stop'")
    t0 = time.monotonic()
    new_pid = wait_ping(cluster, 1 + 9, message="a new worker within restart_interval + 9 s")
    assert new_pid != pid
    print(f"worker back after {time.monotonic() - t0:.2f} s")


@pytest.mark.testbed(extra_conf=FAST_RESTART)
def test_worker_leaves_when_the_extension_is_updated_under_it(cluster):
    # As ALTER EXTENSION aquapeer UPDATE would: the running code is not the catalog's version.
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    version = cluster.scalar("select extversion from pg_extension where extname = 'aquapeer'")
    offset = cluster.log_size()
    cluster.sql("update pg_extension set extversion = '9.9.9' where extname = 'aquapeer'")
    try:
        cluster.wait_for_log(rf"the extension is now version 9.9.9, this worker runs {re.escape(version)}",
                             10, since=offset)
        cluster.wait_for_log(rf"\(PID {pid}\) exited with exit code 1", 10, since=offset)
    finally:
        cluster.sql("update pg_extension set extversion = %s where extname = 'aquapeer'", version)
    assert wait_ping(cluster, 15) != pid


# --------------------------------------------------------------------------
# 6. a crash: crash recovery, then the worker comes back
# --------------------------------------------------------------------------

@pytest.mark.testbed(extra_conf=FAST_RESTART)
def test_worker_comes_back_after_kill_9(cluster):
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    assert cluster.backend_pids(WORKER) == [pid]
    postmaster = cluster.postmaster_pid()
    offset = cluster.log_size()
    os.kill(pid, signal.SIGKILL)
    cluster.wait_for_log(r"all server processes terminated; reinitializing", 15, since=offset)
    log = cluster.log(offset)
    assert re.search(rf"\(PID {pid}\) was terminated by signal 9", log), log
    new_pid = wait_ping(cluster, 30, message="the worker to come back after crash recovery")
    assert new_pid != pid
    assert cluster.postmaster_pid() == postmaster


# --------------------------------------------------------------------------
# 7. DROP DATABASE, ALTER DATABASE RENAME, CREATE DATABASE ... TEMPLATE
# --------------------------------------------------------------------------

@pytest.mark.testbed(extra_conf={"aquapeer.database": "appdb", **FAST_RESTART})
def test_database_commands_on_the_workers_database(cluster):
    cluster.sql("create database appdb")
    create_extension(cluster, "appdb")
    pid = wait_ping(cluster, 20, "appdb")

    # CREATE DATABASE ... TEMPLATE appdb: the worker steps aside, then returns.
    cluster.sql("create database copy1 template appdb")
    assert cluster.scalar("select count(*) from pg_database where datname = 'copy1'") == 1
    pid2 = tb.wait_for(lambda: [p for p in worker_pids(cluster, "appdb") if p != pid], 15,
                       message="a new worker in appdb after the template copy")[0]
    assert wait_ping(cluster, 15, "appdb") == pid2

    # ALTER DATABASE ... RENAME succeeds while the worker runs.
    cluster.sql("alter database appdb rename to appdb2")
    assert cluster.scalar("select count(*) from pg_database where datname = 'appdb2'") == 1
    cluster.sql("alter database appdb2 rename to appdb")
    wait_ping(cluster, 15, "appdb")

    # DROP DATABASE succeeds, within PostgreSQL's own 5 s wait.
    t0 = time.monotonic()
    cluster.sql("drop database appdb")
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f"drop database took {elapsed:.2f} s"
    assert cluster.scalar("select count(*) from pg_database where datname = 'appdb'") == 0


# --------------------------------------------------------------------------
# 8. peer.start_worker() / peer.stop_worker() without preloading
# --------------------------------------------------------------------------

@pytest.mark.testbed(preload=False)
def test_start_and_stop_worker_without_preload(cluster):
    create_extension(cluster)
    assert all_worker_pids(cluster) == []

    started = cluster.scalar("select peer.start_worker()")
    m = re.fullmatch(r"started \(pid (\d+)\)", started)
    assert m, started
    pid = int(m.group(1))
    assert pings(cluster)
    assert worker_pids(cluster) == [pid]

    assert cluster.scalar("select peer.start_worker()") == f"already running (pid {pid})"
    assert worker_pids(cluster) == [pid]

    assert cluster.scalar("select peer.stop_worker()") == f"stopped (pid {pid})"
    tb.wait_for(lambda: process_gone(pid), 5, message=f"worker process {pid} to be gone")
    assert all_worker_pids(cluster) == []
    assert cluster.scalar("select peer.stop_worker()") == "not running"

    t0 = time.monotonic()
    with pytest.raises(psycopg.Error) as err:
        cluster.scalar("select peer.ping_worker()")
    elapsed = time.monotonic() - t0
    assert "is not running" in err.value.diag.message_primary
    assert "peer.start_worker()" in (err.value.diag.message_hint or "")
    # Not the control request's 10 s; loading the payload in a new session takes a while when loaded.
    assert elapsed < 5, f"the error took {elapsed:.2f} s"


# --------------------------------------------------------------------------
# 9. with preloading, stop_worker() holds the launcher until start_worker()
# --------------------------------------------------------------------------

@pytest.mark.testbed(extra_conf=FAST_RESTART)
def test_stopped_worker_stays_stopped_until_started(cluster):
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    assert cluster.scalar("select peer.stop_worker()") == f"stopped (pid {pid})"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert all_worker_pids(cluster) == [], "the launcher restarted a stopped worker"
        time.sleep(0.2)
    assert all_worker_pids(cluster) == []

    started = cluster.scalar("select peer.start_worker()")
    m = re.fullmatch(r"started \(pid (\d+)\)", started)
    assert m, started
    assert int(m.group(1)) != pid
    assert wait_ping(cluster, 10) == int(m.group(1))


# --------------------------------------------------------------------------
# 10. privileges
# --------------------------------------------------------------------------

@pytest.mark.testbed(extra_conf=FAST_RESTART)
def test_start_and_stop_need_aquapeer_admin(cluster):
    create_extension(cluster)
    pid = wait_ping(cluster, 20)
    cluster.sql("create role plain login; create role admin login; grant aquapeer_admin to admin")

    with cluster.connect(user="plain") as conn:
        for fn in ("peer.start_worker()", "peer.stop_worker()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                conn.execute(f"select {fn}")
            assert "permission denied" in str(err.value)
    assert worker_pids(cluster) == [pid], "a refused call changed the worker"

    with cluster.connect(user="admin") as conn:
        assert conn.execute("select peer.stop_worker()").fetchone()[0] == f"stopped (pid {pid})"
        started = conn.execute("select peer.start_worker()").fetchone()[0]
        assert re.fullmatch(r"started \(pid \d+\)", started), started
        assert conn.execute("select peer.start_worker()").fetchone()[0] == \
            started.replace("started", "already running")
    assert pings(cluster)


# --------------------------------------------------------------------------
# 11. no background worker slot free
# --------------------------------------------------------------------------

@pytest.mark.testbed(preload=False, extra_conf={"max_worker_processes": 1})
def test_start_worker_without_a_free_slot_fails_fast(cluster):
    # the logical replication launcher takes the only slot
    tb.wait_for(lambda: cluster.backend_pids("logical replication launcher"), 10,
                message="the logical replication launcher")
    create_extension(cluster)
    t0 = time.monotonic()
    with pytest.raises(psycopg.Error) as err:
        cluster.scalar("select peer.start_worker()")
    elapsed = time.monotonic() - t0
    diag = err.value.diag
    text = " ".join(filter(None, (diag.message_primary, diag.message_detail, diag.message_hint)))
    assert "max_worker_processes" in text, text
    assert elapsed < 5, f"the error took {elapsed:.2f} s"
    assert all_worker_pids(cluster) == []


@pytest.mark.testbed(extra_conf={"max_worker_processes": 2})
def test_preloaded_start_worker_without_a_free_slot_fails_fast(cluster):
    # The launcher and the logical replication launcher take both slots.
    tb.wait_for(lambda: cluster.backend_pids("logical replication launcher")
                and cluster.backend_pids("aquapeer launcher"), 10, message="both launchers")
    create_extension(cluster)
    t0 = time.monotonic()
    with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="no background worker slot is free"):
        cluster.scalar("select peer.start_worker()")
    assert time.monotonic() - t0 < 5
    assert all_worker_pids(cluster) == []


# --------------------------------------------------------------------------
# 12. start_worker() where the extension is not installed
# --------------------------------------------------------------------------

def test_start_worker_without_the_extension_errors(shared_cluster):
    shared_cluster.sql("create database aq_noext")
    try:
        with shared_cluster.connect("aq_noext", options="-c statement_timeout=10s") as conn:
            with pytest.raises(psycopg.Error) as err:
                conn.execute("select peer.start_worker()")
        assert err.value.sqlstate in ("42883", "3F000"), (err.value.sqlstate, str(err.value))
    finally:
        shared_cluster.sql("drop database aq_noext")


# --------------------------------------------------------------------------
# 13. a hot standby runs no worker
# --------------------------------------------------------------------------

def make_standby(primary):
    """A streaming hot standby of ``primary`` in the same base dir (so the
    bed's teardown removes it), built with pg_basebackup as the server user.
    Uses the Cluster class for its lifecycle, skipping initdb."""
    standby = tb.Cluster("standby", primary.base_dir, preload=True)
    _, uid, gid = tb.server_user()
    for d in (standby.dir, standby.sock_dir):
        os.makedirs(d, mode=0o700)
        if os.geteuid() == 0:
            os.chown(d, uid, gid)
    tb._live_clusters.add(standby)  # the atexit safety net
    standby._run([standby._bin("pg_basebackup"), "-D", standby.data_dir, "-h", primary.sock_dir,
                  "-p", str(primary.port), "-U", "postgres", "-X", "stream", "-R",
                  "--no-sync", "-c", "fast"], timeout=120)
    standby.port = tb.free_port()
    standby._initialized = True
    standby._write_conf()  # replaces the primary's testbed.conf: own port and socket
    return standby


def test_hot_standby_runs_no_worker(cluster):
    create_extension(cluster)
    primary_pid = wait_ping(cluster, 20)
    standby = make_standby(cluster)
    try:
        standby.start()
        assert standby.scalar("select pg_is_in_recovery()") is True
        assert standby.scalar("show shared_preload_libraries") == "aquapeer"
        # the extension reached the standby
        tb.wait_for(lambda: standby.scalar(
            "select count(*) from pg_extension where extname = 'aquapeer'") == 1, 15,
            message="the extension to replicate")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert standby.backend_pids(WORKER) == [], "a worker runs on the standby"
            time.sleep(0.25)
        assert standby.backend_pids(WORKER) == []
        assert cluster.backend_pids(WORKER) == [primary_pid]
    finally:
        standby.destroy()
