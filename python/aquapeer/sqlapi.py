"""What the SQL functions in schema peer call: the bridge from plpy to the modules.

Only this module and db.PlpyDatabase touch plpy.  Errors a user can act on
(AquapeerError) become PostgreSQL errors with their SQLSTATE, detail and hint.
"""

import functools
import json
import time

import plpy

from . import control, executor, worker
from .db import PlpyDatabase
from .errors import AquapeerError, WorkerUnavailable

_db = PlpyDatabase(plpy)


class _SQLError(plpy.Error):
    """Reported by PL/Python as "aquapeer: <message>" with the error's SQLSTATE, detail and hint."""


_SQLError.__module__ = "__main__"  # PL/Python then prefixes only the class name
_SQLError.__name__ = _SQLError.__qualname__ = "aquapeer"


def sql_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AquapeerError as e:
            error = _SQLError(e.message)
            error.sqlstate, error.detail, error.hint = e.sqlstate, e.detail, e.hint
            raise error from None
    return wrapper


def _check_interrupts():
    _db.query("select peer._check_interrupts()")


def _client():
    row = _db.query("select oid, datname from pg_catalog.pg_database "
                    "where datname = pg_catalog.current_database()")[0]
    return control.ControlClient(row["oid"], row["datname"], check_interrupts=_check_interrupts)


@sql_errors
def ping_worker():
    """Round trip to the worker over the control channel, in seconds."""
    with _client() as client:
        client.connect()
        started = time.perf_counter()
        client.request("ping", timeout=5.0)
        return time.perf_counter() - started


STATUS_COLUMNS = ("pid", "state", "started_at", "database", "python_version", "aiortc_version",
                  "aquapeer_version", "loop_lag_max_ms", "executors", "requests", "wakeups")


@sql_errors
def worker_status():
    try:
        with _client() as client:
            status = client.request("status", timeout=2.0)
        status["executors"] = json.dumps(status["executors"])
    except WorkerUnavailable:
        # No loop answers: the process may still be starting, or there is none.
        pid = _db.scalar("select peer._worker_pid()")
        status = {"pid": pid, "state": "starting" if pid else "stopped",
                  "database": _db.scalar("select pg_catalog.current_database()::text")}
    return [{column: status.get(column) for column in STATUS_COLUMNS}]


@sql_errors
def run_in_executor(role_oid, function_oid, arg, timeout_s):
    with _client() as client:
        return client.request(
            "exec", {"role": role_oid, "function": function_oid, "arg": arg,
                     "timeout_ms": int(timeout_s * 1000)},
            timeout=timeout_s + executor.ANSWER_GRACE_S + executor.START_TIMEOUT_S)


@sql_errors
def nudge_worker():
    """Wake the worker; best effort, as it runs after the caller's commit is decided."""
    try:
        with _client() as client:
            client.notify("wake")
    except AquapeerError:
        return False
    return True


def worker_answers():
    """Whether this database's worker answers on its control socket right now."""
    try:
        with _client() as client:
            client.request("ping", timeout=1.0)
    except AquapeerError:
        return False
    return True


def worker_main():
    worker.main(_db)


def executor_main():
    executor.serve(_db)
