"""Tests of the test bed itself (tests/testbed.py), with preload=False so they
pass before the extension is built.  They use local clusters whatever the
backend, except test_docker_backend."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import psycopg
import pytest

import testbed as tb

HAVE_LOCAL_PG = os.path.exists(os.path.join("/usr/lib/postgresql/15/bin", "initdb")) \
    or bool(os.environ.get("PG_CONFIG"))

local = pytest.mark.skipif(not HAVE_LOCAL_PG, reason="no local PostgreSQL 15 server binaries")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _processes_under(path: str) -> list[int]:
    return tb._pids_with_cwd_under(path)


@pytest.fixture
def bed():
    with tb.Testbed(2, preload=False) as b:
        yield b


@local
def test_two_clusters_each_own_port_and_socket(bed):
    alice, bob = bed.alice, bed.bob
    assert [c.name for c in bed] == ["alice", "bob"]
    assert alice.port != bob.port
    assert alice.sock_dir != bob.sock_dir
    for c in (alice, bob):
        assert os.path.exists(os.path.join(c.sock_dir, f".s.PGSQL.{c.port}"))
        assert c.scalar("select 1") == 1
        assert c.scalar("show port") == str(c.port)
        assert c.scalar("show unix_socket_directories") == c.sock_dir
        assert c.scalar("show listen_addresses") == "127.0.0.1"
        assert c.scalar("show fsync") == "off"
        assert c.scalar("show aquapeer.database") == "postgres"
        assert c.scalar("show shared_preload_libraries") == ""
        with psycopg.connect(c.tcp_dsn, autocommit=True) as conn:  # TCP on loopback
            assert conn.execute("select host(inet_server_addr())").fetchone()[0] == "127.0.0.1"
    # the socket path must stay well below the 107-byte limit
    assert len(os.path.join(alice.sock_dir, f".s.PGSQL.{alice.port}")) < 90
    assert bed.base_dir.startswith("/tmp/aqp-")


@local
def test_server_runs_as_postgres_user(bed):
    _, uid, gid = tb.server_user()
    if os.geteuid() == 0:
        assert tb.server_user()[0] == "postgres"
    for c in bed:
        pids = c.pids()
        assert len(pids) >= 4  # postmaster, checkpointer, bgwriter, walwriter, ...
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            assert set(map(int, uids)) == {uid}, (pid, uids)
        for d in (c.dir, c.data_dir, c.sock_dir):
            st = os.stat(d)
            assert st.st_uid == uid
            assert stat.S_IMODE(st.st_mode) == 0o700


@local
def test_sql_placeholders(bed):
    c = bed.alice
    assert c.sql("select %s::int + 1, %s::text", 41, "x") == [(42, "x")]
    assert c.sql("select %(a)s::int * 2", {"a": 21}) == [(42,)]
    assert c.sql("select 'no params: 100%'") == [("no params: 100%",)]
    assert c.sql("select '%%'||%s", "x") == [("%x",)]
    assert c.sql("create table t(i int); insert into t values (1),(2); select sum(i) from t") \
        == [(3,)]
    assert c.sql("drop table t") == []
    assert c.scalar("select 1 where false") is None
    c.sql("create database other")
    assert c.scalar("select current_database()", dbname="other") == "other"
    with c.connect("other") as conn:
        assert conn.autocommit
    assert "host=" in c.dsn and f"port={c.port}" in c.dsn
    with psycopg.connect(c.dsn) as conn:
        assert conn.execute("select current_user").fetchone()[0] == "postgres"


@local
def test_extra_conf_is_written_and_quoted(make_testbed_local):
    b = make_testbed_local(1, extra_conf={"application_name": "it's", "work_mem": "8MB",
                                          "max_connections": 50, "log_connections": True,
                                          "aquapeer.restart_interval": 1})
    c = b[0]
    assert c.scalar("show application_name") == "it's"
    assert c.scalar("show work_mem") == "8MB"
    assert c.scalar("show max_connections") == "50"
    assert c.scalar("show log_connections") == "on"
    assert c.scalar("show aquapeer.restart_interval") == "1"
    c.configure(application_name="changed", reload=True)
    tb.wait_for(lambda: c.scalar("show application_name") == "changed", 10)


@local
def test_stop_start_restart(bed):
    c = bed.bob
    port = c.port
    took = c.stop()
    assert isinstance(took, float) and 0 < took < 30
    assert not c.is_running() and c.pids() == []
    with pytest.raises(psycopg.OperationalError):
        c.connect()
    c.start()
    assert c.is_running() and c.scalar("select 1") == 1
    pm = c.postmaster_pid()
    c.restart()
    assert c.postmaster_pid() not in (None, pm)
    assert c.port == port and c.scalar("select 1") == 1
    assert "database system is ready to accept connections" in c.log()


@local
def test_kill9_leaves_no_process_and_recovers(bed):
    c = bed.alice
    held = c.connect()  # a client backend too
    pids = c.pids()
    assert c.postmaster_pid() == pids[0] and len(pids) >= 5
    offset = c.log_size()
    c.kill9()
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    assert c.pids() == [] and not c.is_running()
    assert _processes_under(c.data_dir) == []
    held.close()
    assert bed.bob.scalar("select 1") == 1  # the neighbour is untouched
    c.start()
    assert c.scalar("select 1") == 1
    assert "not properly shut down" in c.log(since=offset)


@local
def test_destroy_leaves_no_process_and_no_directory():
    base = tb.make_base_dir()
    try:
        c = tb.Cluster("solo", base, preload=False)
        c.init().start()
        pids = c.pids()
        assert pids and c.scalar("select 1") == 1
        c.destroy()
        assert all(_gone(p) for p in pids)
        assert not os.path.exists(c.dir)
        c.destroy()  # idempotent
    finally:
        tb.remove_base_dir(base)
    assert not os.path.exists(base)


@local
def test_failing_body_inside_testbed_still_cleans_up():
    seen = {}
    with pytest.raises(RuntimeError, match="boom"):
        with tb.Testbed(2, preload=False) as b:
            seen["base"] = b.base_dir
            seen["pids"] = [p for c in b for p in c.pids()]
            assert len(seen["pids"]) >= 10
            raise RuntimeError("boom")
    assert not os.path.exists(seen["base"])
    assert all(_gone(p) for p in seen["pids"])


@local
def test_sequential_start_and_add():
    with tb.Testbed(2, preload=False, parallel=False) as b:
        carol = b.add()
        assert carol.name == "carol" and b["carol"] is carol and b[2] is carol
        assert len({c.port for c in b}) == 3
        assert all(c.scalar("select 1") == 1 for c in b)
        base = b.base_dir
    assert not os.path.exists(base)


@local
def test_port_taken_before_start_is_replaced():
    with tb.Testbed(1, preload=False, start=False) as b:
        c = b[0]
        old = c.port
        with socket.socket() as blocker:
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            blocker.bind(("127.0.0.1", old))
            blocker.listen()
            c.start()
        assert c.port != old
        assert c.scalar("show port") == str(c.port)


@local
def test_preload_without_installed_extension_says_make_install(monkeypatch, tmp_path):
    monkeypatch.setattr(tb, "pkglibdir", lambda: str(tmp_path))
    base = tb.make_base_dir()
    try:
        with pytest.raises(tb.ExtensionNotInstalled, match="make install"):
            tb.Cluster("x", base, preload=True).init()
    finally:
        tb.remove_base_dir(base)


@local
def test_reap_stale_removes_dirs_of_dead_owners():
    dead = subprocess.Popen(["true"])
    dead.wait()
    base = tb.make_base_dir()
    with open(os.path.join(base, tb.OWNER_FILE), "w") as f:
        f.write(f"{dead.pid} 0\n")
    os.makedirs(os.path.join(base, "x"))
    mine = tb.make_base_dir()  # owned by this live process: kept
    try:
        removed = tb.reap_stale()
        assert base in removed and mine not in removed
        assert not os.path.exists(base) and os.path.exists(mine)
    finally:
        tb.remove_base_dir(mine)
        tb.remove_base_dir(base)


def test_wait_for():
    t0 = time.monotonic()
    assert tb.wait_for(lambda: time.monotonic() - t0 > 0.1 and "ok", 5) == "ok"
    with pytest.raises(TimeoutError, match="never"):
        tb.wait_for(lambda: False, 0.1, message="never")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return 7
    assert tb.wait_for(flaky, 5, 0.01, ignore=(ConnectionError,)) == 7
    with pytest.raises(ValueError):
        tb.wait_for(lambda: int("x"), 1)


def test_conf_value():
    assert tb.conf_value(5) == "5"
    assert tb.conf_value(1.5) == "1.5"
    assert tb.conf_value(True) == "on"
    assert tb.conf_value("it's") == "'it''s'"
    assert tb.conf_value("a\\b") == "'a\\\\b'"


@local
def test_demo_clusters_only():
    pytest.importorskip("rich")
    demo = os.path.join(tb.REPO_ROOT, "scripts", "demo.py")
    proc = subprocess.run([sys.executable, demo, "--clusters-only"], capture_output=True,
                          text=True, timeout=120, cwd=tb.REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alice" in proc.stdout and "bob" in proc.stdout
    assert "torn down" in proc.stdout


@pytest.mark.docker
def test_docker_backend(request):
    """The docker backend: skipped, saying why, where no engine is reachable."""
    if os.environ.get("AQUAPEER_TEST_DOCKER") == "1":
        make = request.getfixturevalue("make_testbed")  # skips with its reason
        bed = make(1, preload=False)
    else:
        err = tb.docker_engine_error()
        if err:
            pytest.skip(f"no Docker engine here: {err}")
        bed = tb.Testbed(1, preload=False, backend="docker").__enter__()
        request.addfinalizer(bed.close)
    c = bed[0]
    assert c.backend == "docker"
    assert c.scalar("select 1") == 1
    assert c.scalar("select current_setting('server_version_num')::int / 10000") == 15


# a local-only factory for the tests above (make_testbed follows the backend)
@pytest.fixture
def make_testbed_local():
    beds = []

    def make(n=2, **kw):
        kw.setdefault("preload", False)
        b = tb.Testbed(n, **kw).__enter__()
        beds.append(b)
        return b
    yield make
    for b in beds:
        b.close()
