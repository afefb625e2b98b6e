"""Remote calls: peer.expose on one database, peer.call from a friend.

Real clusters, a real signaling server and real aiortc on loopback.  The
module shares three clusters: bob exposes functions, alice and carol are
bob's friends (and not each other's) and call them.
"""

import contextlib
import json
import threading
import time

import psycopg
import pytest

import testbed as tb

BOB_FUNCTIONS = """
    create function public.add(a jsonb) returns jsonb language sql as $$
        select to_jsonb((a->>'x')::int + (a->>'y')::int) $$;
    create function public.echo(a jsonb) returns jsonb language sql as $$ select a $$;
    create function public.divide(a jsonb) returns jsonb language sql as $$
        select to_jsonb((a->>'x')::int / (a->>'y')::int) $$;
    create function public.fail(a jsonb) returns jsonb language plpgsql as $$
    begin
        raise exception 'custom failure: %', a->>'why' using errcode = coalesce(a->>'code', 'P0001');
    end $$;
    create function public.nap(a jsonb) returns jsonb language sql as $$
        select pg_sleep((a->>'s')::float8); select a $$;
    create function public.whoami(a jsonb) returns jsonb language sql as $$
        select jsonb_build_object('current_user', current_user, 'session_user', session_user) $$;
    create table public.secret (v text);
    insert into public.secret values ('hidden');
    create function public.read_secret(a jsonb) returns jsonb language sql as $$
        select to_jsonb(array_agg(v)) from public.secret $$;
    create function public.not_callable(a text) returns text language sql as $$ select a $$;
"""


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------

def call(cluster, fn, arg=None, timeout=None, friend="bob"):
    """peer.call(friend, fn, arg, timeout); the defaults of peer.call where None."""
    if arg is None and timeout is None:
        return cluster.scalar("select peer.call(%s, %s)", friend, fn)
    if timeout is None:
        return cluster.scalar("select peer.call(%s, %s, %s::jsonb)", friend, fn, json.dumps(arg))
    return cluster.scalar("select peer.call(%s, %s, %s::jsonb, %s::interval)", friend, fn,
                          json.dumps(arg if arg is not None else {}), timeout)


@contextlib.contextmanager
def exposed(bob, fn, friend=None, as_name=None):
    """peer.expose for the duration of a block; yields the published name."""
    name = bob.scalar("select peer.expose(%s, %s, %s)", fn, friend, as_name)
    try:
        yield name
    finally:
        bob.sql("select peer.unexpose(%s, %s)", name, friend)


MODULE_TESTBED = {"n": 3, "names": ["alice", "bob", "carol"]}


@pytest.fixture(scope="module")
def trio(module_testbed, module_signal_server):
    alice, bob, carol = module_testbed.alice, module_testbed.bob, module_testbed.carol
    for cluster in (alice, bob, carol):
        tb.join_signaling(cluster, module_signal_server.url)
    tb.befriend(alice, "alice", bob, "bob")
    tb.befriend(carol, "carol", bob, "bob")
    bob.sql(BOB_FUNCTIONS)
    for caller in (alice, carol):
        assert caller.scalar("select peer.connect('bob')") == "connected"
    return alice, bob, carol


@pytest.fixture
def peers(trio):
    alice, bob, carol = trio
    tb.wait_connected(alice, "bob")
    tb.wait_connected(carol, "bob")
    return trio


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

def test_an_exposed_function_is_called_by_name_and_nothing_else_is(peers):
    alice, bob, carol = peers
    # nothing is exposed yet
    for name in ("public.add", "public.whoami", "pg_catalog.version", "public.no_such_function"):
        with pytest.raises(psycopg.errors.UndefinedFunction, match="not exposed"):
            call(alice, name, {"x": 1, "y": 2})
    with exposed(bob, "public.add(jsonb)") as name:
        assert name == "public.add"
        assert call(alice, "public.add", {"x": 2, "y": 3}) == 5
        assert call(carol, "public.add", {"x": 20, "y": 22}) == 42  # friend null: every friend
        # published under its name, not under others
        for other in ("add", "public.add(jsonb)", "PUBLIC.ADD"):
            with pytest.raises(psycopg.errors.UndefinedFunction, match="not exposed"):
                call(alice, other, {"x": 2, "y": 3})
    with exposed(bob, "public.add(jsonb)", as_name="sum") as name:
        assert name == "sum"
        assert call(alice, "sum", {"x": 40, "y": 2}) == 42
        with pytest.raises(psycopg.errors.UndefinedFunction, match="not exposed"):
            call(alice, "public.add", {"x": 2, "y": 3})  # only as "sum"
    # unexposed: refused again
    for name in ("sum", "public.add"):
        with pytest.raises(psycopg.errors.UndefinedFunction, match="not exposed"):
            call(alice, name, {"x": 2, "y": 3})
    # exposed to alice only
    with exposed(bob, "public.echo(jsonb)", friend="alice") as name:
        assert call(alice, name, {"hello": ["world", 1, None]}) == {"hello": ["world", 1, None]}
        assert call(alice, name) == {}  # arg defaults to {}
        with pytest.raises(psycopg.errors.UndefinedFunction, match="not exposed"):
            call(carol, name, {"hello": "carol"})
        # unexposing the every-friend entry does not touch alice's
        assert bob.scalar("select peer.unexpose(%s)", name) is False
        assert call(alice, name, {"still": True}) == {"still": True}
    with pytest.raises(psycopg.errors.UndefinedFunction, match="not exposed"):
        call(alice, "public.echo", {})
    # the shape of what may be exposed, and who may be called
    with pytest.raises(psycopg.errors.InvalidFunctionDefinition):
        bob.sql("select peer.expose('public.not_callable(text)')")
    with pytest.raises(psycopg.errors.UndefinedObject, match='unknown friend "nobody"'):
        call(alice, "public.add", {}, friend="nobody")


def test_a_remote_error_keeps_its_sqlstate(peers):
    alice, bob, _ = peers
    with exposed(bob, "public.divide(jsonb)") as divide, exposed(bob, "public.fail(jsonb)") as fail:
        assert call(alice, divide, {"x": 84, "y": 2}) == 42
        with pytest.raises(psycopg.errors.DivisionByZero, match="bob: division by zero"):
            call(alice, divide, {"x": 1, "y": 0})
        with pytest.raises(psycopg.errors.RaiseException, match="bob: custom failure: because"):
            call(alice, fail, {"why": "because"})
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="custom failure: bad value"):
            call(alice, fail, {"why": "bad value", "code": "22023"})
        with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="bob: "):
            call(alice, divide, {"x": "one", "y": 1})
        # the next call after errors works
        assert call(alice, divide, {"x": 9, "y": 3}) == 3
        # an SQLSTATE of the function's own, which PostgreSQL has no name for
        with pytest.raises(psycopg.Error, match="bob: custom failure: own code") as excinfo:
            call(alice, fail, {"why": "own code", "code": "AQ123"})
        assert excinfo.value.sqlstate == "AQ123"
        assert call(alice, divide, {"x": 8, "y": 4}) == 2


def test_a_call_times_out_and_can_be_cancelled(peers):
    alice, bob, _ = peers
    with exposed(bob, "public.nap(jsonb)") as nap, exposed(bob, "public.add(jsonb)") as add:
        assert call(alice, nap, {"s": 0.1}, "5 s") == {"s": 0.1}
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="timed out"):
            call(alice, nap, {"s": 5}, "1 s")
        assert time.monotonic() - started < 4  # the timeout, not the 5 s nap, with room for a loaded machine
        assert call(alice, add, {"x": 1, "y": 1}) == 2  # the caller's next call is not held up

        with alice.connect() as conn:
            pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            canceller = threading.Timer(0.5, lambda: alice.sql("select pg_cancel_backend(%s)", pid))
            started = time.monotonic()
            canceller.start()
            try:
                with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to user request"):
                    conn.execute("select peer.call('bob', %s, '{\"s\": 10}')", [nap])
                elapsed = time.monotonic() - started
            finally:
                canceller.join()
            assert elapsed < 5  # the cancel after 0.5 s, not the 10 s nap, with room for a loaded machine
            assert conn.execute("select peer.call('bob', %s, '{\"x\": 2, \"y\": 2}')", [add]).fetchone()[0] == 4
        # timeouts must be positive
        with pytest.raises(psycopg.Error):
            call(alice, add, {"x": 1, "y": 1}, "0 s")


def test_a_call_runs_as_the_callers_friend_role(peers):
    alice, bob, carol = peers
    bob.sql("create role aq_caller login")
    try:
        with exposed(bob, "public.whoami(jsonb)") as whoami, exposed(bob, "public.read_secret(jsonb)") as secret:
            assert call(alice, whoami) == {"current_user": "aquapeer_friend", "session_user": "aquapeer_friend"}
            bob.sql("select peer.set_friend_role('alice', 'aq_caller')")
            assert call(alice, whoami) == {"current_user": "aq_caller", "session_user": "aq_caller"}
            assert call(carol, whoami) == {"current_user": "aquapeer_friend", "session_user": "aquapeer_friend"}
            # grants apply to the role
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table secret"):
                call(alice, secret)
            bob.sql("grant select on public.secret to aq_caller")
            assert call(alice, secret) == ["hidden"]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                call(carol, secret)
    finally:
        bob.sql("update peer.friend set role = 'aquapeer_friend' where name = 'alice'")
        bob.sql("revoke all on public.secret from aq_caller")
        bob.sql("drop role aq_caller")


def test_an_unreachable_friend_fails_promptly_with_08001(peers):
    alice, bob, _ = peers
    with exposed(bob, "public.add(jsonb)") as add:
        assert call(alice, add, {"x": 1, "y": 2}) == 3
        bob.sql("select peer.stop_worker()")
        try:
            tb.wait_for(lambda: tb.connection_state(alice, "bob") != "connected", 15,
                        message="alice to notice bob's worker is gone")
            started = time.monotonic()
            with pytest.raises(psycopg.Error) as excinfo:
                call(alice, add, {"x": 1, "y": 2}, "5 s")
            elapsed = time.monotonic() - started
            assert excinfo.value.sqlstate == "08001", excinfo.value
            assert elapsed < 9  # within the call's 5 s, with room for a loaded machine
        finally:
            bob.sql("select peer.start_worker()")
        # back: calls work again, without anybody calling peer.connect
        tb.wait_for(lambda: call(alice, add, {"x": 2, "y": 2}, "5 s") == 4, 60, interval=0.5,
                    message="a call to bob after its worker is back", ignore=(psycopg.Error,))


def test_a_call_runs_at_most_once_when_the_connection_drops_and_it_is_sent_again(peers):
    alice, bob, _ = peers
    bob.sql("create table public.ran (at timestamptz default clock_timestamp())")
    bob.sql("grant select, insert on public.ran to aquapeer_friend")
    bob.sql("""create function public.slow_once(a jsonb) returns jsonb language sql as $$
                   insert into public.ran default values; select pg_sleep(1.5);
                   select to_jsonb((select count(*) from public.ran)) $$""")
    try:
        with exposed(bob, "public.slow_once(jsonb)") as slow:
            since = lambda: alice.scalar("select connected_since from peer.connections where friend = 'bob'")  # noqa: E731
            before = since()
            result = {}
            caller = threading.Thread(target=lambda: result.update(value=call(alice, slow, {}, "20 s")))
            caller.start()
            # Running: its uncommitted insert holds a lock on the table.
            tb.wait_for(lambda: bob.scalar("select count(*) from pg_locks where relation = 'public.ran'::regclass"),
                        10, message="the call to run at bob")
            # The link drops mid-call: alice connects again and sends the same call.
            bob.sql("select peer.disconnect('alice')")
            caller.join(30)
            assert result.get("value") == 1, result
            assert bob.scalar("select count(*) from public.ran") == 1
            assert since() > before, "the call was not sent again on a new connection"
    finally:
        bob.sql("drop function public.slow_once(jsonb); revoke all on public.ran from aquapeer_friend; "
                "drop table public.ran")
