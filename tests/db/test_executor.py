"""Executors: SQL run as a role, in its own process, on behalf of the worker."""

import threading
import time

import psycopg
import pytest

import testbed as tb


@pytest.fixture(scope="module")
def roles(worker_cluster):
    worker_cluster.sql("""
        create role aq_exec_alice login;
        create role aq_exec_nologin nologin;
        create table public.aq_secret (v text);
        create function public.aq_whoami(a jsonb) returns jsonb language sql as $$
            select jsonb_build_object('current_user', current_user, 'session_user', session_user,
                                      'pid', pg_backend_pid(), 'arg', a) $$;
        create function public.aq_raise(a jsonb) returns jsonb language plpgsql as $$
            begin raise exception 'custom failure %', a->>'n' using errcode = '22012'; end $$;
        create function public.aq_read_secret(a jsonb) returns jsonb language sql as $$
            select to_jsonb(count(*)) from public.aq_secret $$;
        create function public.aq_sleep(a jsonb) returns jsonb language sql as $$
            select pg_sleep((a->>'s')::float8); select a $$;
    """)
    yield "aq_exec_alice"
    worker_cluster.sql("select peer.stop_worker()")
    worker_cluster.sql("""
        drop function public.aq_whoami(jsonb), public.aq_raise(jsonb), public.aq_read_secret(jsonb),
                      public.aq_sleep(jsonb);
        drop table public.aq_secret;
        drop role aq_exec_alice; drop role aq_exec_nologin;
    """)
    worker_cluster.sql("select peer.start_worker()")


def run(cluster, fn, arg="{}", timeout="30 s", role="aq_exec_alice"):
    return cluster.scalar("select peer.run_in_executor(%s, %s, %s, %s::interval)", role, fn, arg, timeout)


def executor_pids(cluster):
    return {pid for (pid,) in cluster.sql(
        "select pid from pg_stat_activity where backend_type = 'aquapeer executor'")}


def test_runs_connected_as_the_role_not_switched_into_it(worker_cluster, roles):
    result = run(worker_cluster, "public.aq_whoami(jsonb)", '{"x": 1}')
    assert result["current_user"] == result["session_user"] == roles
    assert result["arg"] == {"x": 1}
    row = worker_cluster.sql("select usename, backend_type from pg_stat_activity where pid = %s", result["pid"])
    assert row == [(roles, "aquapeer executor")]


def test_warm_executor_is_reused(worker_cluster, roles):
    first = run(worker_cluster, "public.aq_whoami(jsonb)")["pid"]
    second = run(worker_cluster, "public.aq_whoami(jsonb)")["pid"]
    assert first == second


def test_grants_apply(worker_cluster, roles):
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table aq_secret"):
        run(worker_cluster, "public.aq_read_secret(jsonb)")
    worker_cluster.sql("grant select on public.aq_secret to aq_exec_alice")
    try:
        assert run(worker_cluster, "public.aq_read_secret(jsonb)") == 0
    finally:
        worker_cluster.sql("revoke select on public.aq_secret from aq_exec_alice")


def test_remote_error_keeps_its_sqlstate_and_message(worker_cluster, roles):
    with pytest.raises(psycopg.errors.DivisionByZero, match="custom failure 7"):
        run(worker_cluster, "public.aq_raise(jsonb)", '{"n": 7}')
    # The executor survives its caller's error.
    assert run(worker_cluster, "public.aq_whoami(jsonb)")["current_user"] == roles


def test_statement_timeout_bounds_the_work(worker_cluster, roles):
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
        run(worker_cluster, "public.aq_sleep(jsonb)", '{"s": 30}', timeout="500 ms")
    assert time.monotonic() - started < 10
    assert run(worker_cluster, "public.aq_whoami(jsonb)")["current_user"] == roles


def test_a_role_that_cannot_log_in_is_refused_with_the_fix(worker_cluster, roles):
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        run(worker_cluster, "public.aq_whoami(jsonb)", role="aq_exec_nologin")
    assert "cannot log in" in info.value.diag.message_primary
    assert "LOGIN" in info.value.diag.message_hint


def test_bad_timeout_is_refused(worker_cluster, roles):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="timeout must be positive"):
        run(worker_cluster, "public.aq_whoami(jsonb)", timeout="0 s")


def test_concurrent_calls_run_in_separate_executors(worker_cluster, roles):
    results = []

    def call():
        results.append(run(worker_cluster, "public.aq_sleep(jsonb)", '{"s": 3}'))

    threads = [threading.Thread(target=call), threading.Thread(target=call)]
    for t in threads:
        t.start()
    tb.wait_for(lambda: worker_cluster.scalar(
        "select count(*) from pg_stat_activity where backend_type = 'aquapeer executor' "
        "and wait_event = 'PgSleep'") == 2, 10,
        message="two executors sleeping at once")
    for t in threads:
        t.join()
    assert len(results) == 2


def test_a_cancelled_caller_stops_the_work_and_the_executor(worker_cluster, roles):
    sleeping = []
    with worker_cluster.connect() as conn:
        pid = conn.info.backend_pid

        def cancel_when_sleeping():
            sleeping.append(tb.wait_for(lambda: worker_cluster.scalar(
                "select pid from pg_stat_activity where backend_type = 'aquapeer executor' "
                "and wait_event = 'PgSleep'"), 10))
            worker_cluster.sql("select pg_cancel_backend(%s)", pid)

        t = threading.Thread(target=cancel_when_sleeping)
        t.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select peer.run_in_executor('aq_exec_alice', 'public.aq_sleep(jsonb)', '{\"s\": 60}')")
        t.join()
    # The sleeping executor is cancelled and leaves, rather than sleeping on.
    tb.wait_for(lambda: sleeping[0] not in executor_pids(worker_cluster), 5,
                message="the cancelled executor to leave")


def test_executors_leave_with_the_worker(worker_cluster, roles):
    run(worker_cluster, "public.aq_whoami(jsonb)")
    assert executor_pids(worker_cluster)
    worker_cluster.sql("select peer.stop_worker()")
    try:
        tb.wait_for(lambda: not executor_pids(worker_cluster), 5, message="executors to leave")
    finally:
        worker_cluster.sql("select peer.start_worker()")


def test_idle_executors_leave_after_the_idle_timeout(worker_cluster, roles):
    worker_cluster.sql("update peer.config set executor_idle_timeout = '1 s'")
    worker_cluster.sql("select peer.stop_worker()")
    worker_cluster.sql("select peer.start_worker()")
    try:
        run(worker_cluster, "public.aq_whoami(jsonb)")
        assert executor_pids(worker_cluster)
        tb.wait_for(lambda: not executor_pids(worker_cluster), 10, message="idle executors to leave")
    finally:
        worker_cluster.sql("update peer.config set executor_idle_timeout = '60 s'")
        worker_cluster.sql("select peer.stop_worker()")
        worker_cluster.sql("select peer.start_worker()")


def test_only_the_worker_starts_executors(worker_cluster, roles):
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only the aquapeer worker"):
        worker_cluster.sql("select peer._start_executor('aq_exec_alice'::regrole, repeat('a', 32))")


def test_busy_executors_are_capped_so_friends_cannot_take_every_worker_slot(worker_cluster, roles):
    worker_cluster.sql("update peer.config set executor_limit = 1")
    worker_cluster.sql("select peer.stop_worker()")
    worker_cluster.sql("select peer.start_worker()")
    try:
        sleeper = threading.Thread(target=run, args=(worker_cluster, "public.aq_sleep(jsonb)", '{"s": 3}'))
        sleeper.start()
        tb.wait_for(lambda: worker_cluster.scalar(
            "select count(*) from pg_stat_activity where backend_type = 'aquapeer executor' "
            "and wait_event = 'PgSleep'") == 1, 10, message="one executor sleeping")
        with pytest.raises(psycopg.errors.InsufficientResources, match="all 1 executors stayed busy for 1 s"):
            run(worker_cluster, "public.aq_whoami(jsonb)", timeout="1 s")
        sleeper.join()
        assert run(worker_cluster, "public.aq_whoami(jsonb)")["current_user"] == roles  # the slot is free again
    finally:
        worker_cluster.sql("update peer.config set executor_limit = default")
        worker_cluster.sql("select peer.stop_worker()")
        worker_cluster.sql("select peer.start_worker()")
