"""What the C library (src/) promises beyond starting processes: the wake
frame it writes, its settings' visibility, and staying idle under pg_upgrade."""

from __future__ import annotations

import asyncio
import os
import socket

import psycopg
import pytest

import testbed as tb
from aquapeer import control

LAUNCHER = "aquapeer launcher"


# --------------------------------------------------------------------------
# the wake frame: written by helpers.c, read by control.py
# --------------------------------------------------------------------------

def _listen_in_place_of_the_worker(cluster, dbname):
    """A listening socket where the worker of ``dbname`` would listen, owned
    by the server's OS user so its backends may connect."""
    _, uid, gid = tb.server_user()
    oid = cluster.scalar("select oid from pg_database where datname = %s", dbname)
    socket_dir = os.path.join(cluster.data_dir, control.SOCKET_DIR)
    if not os.path.isdir(socket_dir):
        os.mkdir(socket_dir, 0o700)
        os.chown(socket_dir, uid, gid)
    path = os.path.join(cluster.data_dir, control.socket_path(oid))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chown(path, uid, gid)
    os.chmod(path, 0o600)
    listener.listen(4)
    return listener, path


def _receive_all(listener):
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


async def _read_frames(data):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while (message := await control.read_frame(reader)) is not None:
        frames.append(message)
    return frames


def test_the_wake_sent_at_commit_is_the_frame_the_worker_reads(shared_cluster):
    dbname = "wake_frame"
    shared_cluster.sql(f"create database {dbname}")
    listener = path = None
    try:
        # No worker runs for this database: the launcher serves only aquapeer.database.
        shared_cluster.sql("create extension aquapeer cascade", dbname=dbname)
        listener, path = _listen_in_place_of_the_worker(shared_cluster, dbname)
        listener.settimeout(10)
        shared_cluster.sql("begin; select peer._wake_at_commit(); rollback; "
                           "begin; select peer._wake_at_commit(); commit", dbname=dbname)
        data = _receive_all(listener)
        # The aborted transaction sent nothing: its connection would be queued first.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        if listener is not None:
            listener.close()
            os.unlink(path)
        shared_cluster.sql(f"drop database {dbname} with (force)")

    assert data == control.encode_frame({"id": 0, "op": "wake"})
    assert asyncio.run(_read_frames(data)) == [{"id": 0, "op": "wake"}]


# --------------------------------------------------------------------------
# aquapeer.database: superusers only
# --------------------------------------------------------------------------

def test_only_superusers_see_which_database_runs_the_worker(shared_cluster):
    shared_cluster.sql("create role settings_reader login")
    try:
        assert shared_cluster.scalar("show aquapeer.database") == "postgres"
        with shared_cluster.connect(user="settings_reader") as conn:
            # Its sibling setting is visible: the role can read settings at all.
            assert conn.execute("show aquapeer.restart_interval").fetchone()[0] == "5s"
            with pytest.raises(psycopg.errors.InsufficientPrivilege,
                               match='examine "aquapeer.database"'):
                conn.execute("show aquapeer.database")
            conn.rollback()
            assert conn.execute("select count(*) from pg_settings "
                                "where name = 'aquapeer.database'").fetchone()[0] == 0
    finally:
        shared_cluster.sql("drop role settings_reader")


# --------------------------------------------------------------------------
# pg_upgrade: the server in binary-upgrade mode starts no launcher
# --------------------------------------------------------------------------

def _aquapeer_shmem(cluster):
    return cluster.scalar("select count(*) from pg_shmem_allocations where name = 'aquapeer'")


def test_binary_upgrade_mode_starts_no_launcher(cluster):
    # The preloaded server of every other test: shared memory and a launcher.
    tb.wait_for(lambda: cluster.backend_pids(LAUNCHER), 15, message="the launcher to run")
    assert _aquapeer_shmem(cluster) == 1

    cluster.stop()
    # pg_upgrade starts the new server with -b; Cluster.start takes no server options.
    cluster._run([cluster._bin("pg_ctl"), "start", "-D", cluster.data_dir, "-l", cluster.log_path,
                  "-w", "-t", "60", "-o", "-b"], timeout=90)
    assert cluster.scalar("show aquapeer.database") == "postgres"
    assert _aquapeer_shmem(cluster) == 0
    with pytest.raises(TimeoutError):
        tb.wait_for(lambda: cluster.backend_pids(LAUNCHER), 3, message="a launcher")
