"""The control channel between SQL sessions and the worker, on a real cluster."""

import os
import stat
import struct
import subprocess
import threading
import time

import psycopg
import pytest

import testbed as tb


def socket_file(cluster):
    oid = cluster.scalar("select oid from pg_database where datname = 'postgres'")
    return os.path.join(cluster.data_dir, "pg_aquapeer", f"{oid}.sock")


def test_ping_returns_the_round_trip(worker_cluster):
    rtt = worker_cluster.scalar("select extract(epoch from peer.ping_worker())")
    assert 0 < rtt < 5  # a plausible round trip, even on a loaded machine


def test_socket_is_private_to_the_server_user(worker_cluster):
    uid = tb.server_user()[1]
    path = socket_file(worker_cluster)
    dir_st, sock_st = os.stat(os.path.dirname(path)), os.stat(path)
    assert stat.S_ISSOCK(sock_st.st_mode)
    assert (dir_st.st_uid, stat.S_IMODE(dir_st.st_mode)) == (uid, 0o700)
    assert (sock_st.st_uid, stat.S_IMODE(sock_st.st_mode)) == (uid, 0o600)


def test_other_users_are_turned_away(worker_cluster):
    # root can open the file despite its mode; SO_PEERCRED still refuses it.
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(socket_file(worker_cluster))
    frame = b"\x83\xa2id\x01\xa2op\xa4ping\xa4args\x80"
    try:
        sock.sendall(struct.pack(">I", len(frame)) + frame)
        answer = sock.recv(100)
    except (ConnectionResetError, BrokenPipeError):
        answer = b""
    finally:
        sock.close()
    assert answer == b""  # closed without an answer


def test_garbage_on_the_socket_leaves_the_worker_running(worker_cluster):
    script = (
        "import os, socket, struct, sys\n"
        "for payload in [os.urandom(2000), struct.pack('>I', 1 << 30), struct.pack('>I', 3) + b'\\xc1\\xc1\\xc1',"
        " struct.pack('>I', 2) + b'\\x92\\x01']:\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(payload); s.close()\n")
    subprocess.run(["runuser", "-u", tb.server_user()[0], "--", "/usr/bin/python3", "-c", script,
                    socket_file(worker_cluster)], check=True, timeout=30)
    assert worker_cluster.scalar("select peer.ping_worker() is not null")
    assert worker_cluster.scalar("select state from peer.worker_status()") == "running"


def test_nudge_reaches_the_worker(worker_cluster):
    before = worker_cluster.scalar("select wakeups from peer.worker_status()")
    assert worker_cluster.scalar("select peer.nudge_worker()") is True
    tb.wait_for(lambda: worker_cluster.scalar("select wakeups from peer.worker_status()") == before + 1, 5)


def test_wake_at_commit_wakes_once_after_commit_and_never_after_rollback(worker_cluster):
    def wakeups():
        return worker_cluster.scalar("select wakeups from peer.worker_status()")

    before = wakeups()
    with worker_cluster.connect() as conn:
        conn.autocommit = False
        conn.execute("select peer._wake_at_commit()")
        conn.execute("select peer._wake_at_commit()")
        time.sleep(0.3)
        assert wakeups() == before, "woken before the commit"
        conn.commit()
        tb.wait_for(lambda: wakeups() == before + 1, 5)
        conn.execute("select peer._wake_at_commit()")
        conn.rollback()
        conn.execute("select 1")
        conn.commit()
    time.sleep(0.3)
    assert wakeups() == before + 1


@pytest.fixture
def sleeper(worker_cluster):
    worker_cluster.sql("create role aq_sleeper login")
    worker_cluster.sql("create function public.aq_sleep(a jsonb) returns jsonb language sql "
                       "as $$ select pg_sleep((a->>'s')::float8); select a $$")
    yield "aq_sleeper"
    worker_cluster.sql("drop function public.aq_sleep(jsonb)")
    worker_cluster.sql("drop role aq_sleeper")


def _waiting_call(conn):
    return conn.execute("select peer.run_in_executor('aq_sleeper', 'public.aq_sleep(jsonb)', "
                        "'{\"s\": 20}', timeout => '30 s')")


def test_a_waiting_request_is_cancelled_promptly(worker_cluster, sleeper):
    with worker_cluster.connect() as conn:
        pid = conn.info.backend_pid
        result = {}

        def cancel_later():
            tb.wait_for(lambda: worker_cluster.scalar(
                "select wait_event is null and state = 'active' from pg_stat_activity where pid = %s", pid), 10)
            time.sleep(0.5)
            result["cancelled_at"] = time.monotonic()
            worker_cluster.sql("select pg_cancel_backend(%s)", pid)

        t = threading.Thread(target=cancel_later)
        t.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            _waiting_call(conn)
        elapsed = time.monotonic() - result["cancelled_at"]
        t.join()
    assert elapsed < 5  # not the 20 s sleep, with room for a loaded machine


def test_statement_timeout_ends_a_waiting_request(worker_cluster, sleeper):
    with worker_cluster.connect() as conn:
        conn.execute("set statement_timeout = '700ms'")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            _waiting_call(conn)
        assert time.monotonic() - started < 0.7 + 4  # not the 20 s sleep, with room for a loaded machine


def test_no_worker_fails_fast_naming_the_database_and_the_fix(worker_cluster):
    worker_cluster.scalar("select peer.stop_worker()")
    try:
        with worker_cluster.connect() as conn:
            started = time.monotonic()
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
                conn.execute("select peer.ping_worker()")
            # Not the control request's 10 s; loading the payload in a new session takes a while when loaded.
            assert time.monotonic() - started < 5
        diag = info.value.diag
        assert 'worker for database "postgres" is not running' in diag.message_primary
        assert "peer.start_worker()" in diag.message_hint
    finally:
        assert worker_cluster.scalar("select peer.start_worker()").startswith("started")
    assert worker_cluster.scalar("select peer.ping_worker() is not null")
