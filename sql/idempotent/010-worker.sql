-- The worker, its executors and the C helpers they stand on.

-- C helpers ------------------------------------------------------------------
create or replace function peer._library_version() returns text
    language c strict as 'MODULE_PATHNAME', 'aquapeer_library_version';
comment on function peer._library_version() is 'the aquapeer version the loaded C library was built as';

create or replace function peer._payload_dir() returns text
    language c strict as 'MODULE_PATHNAME', 'aquapeer_payload_dir';
comment on function peer._payload_dir() is 'where the loaded C library looks for this version''s Python payload';

create or replace function peer._should_stop() returns text
    language c as 'MODULE_PATHNAME', 'aquapeer_should_stop';
comment on function peer._should_stop() is 'why the calling worker or executor should leave its loop, or null; lets cancels through';

create or replace function peer._check_interrupts() returns void
    language c as 'MODULE_PATHNAME', 'aquapeer_check_interrupts';
comment on function peer._check_interrupts() is 'raise a pending cancel, statement timeout or termination now';

create or replace function peer._executor_nonce() returns text
    language c as 'MODULE_PATHNAME', 'aquapeer_executor_nonce';
comment on function peer._executor_nonce() is 'the nonce an executor proves itself with to the worker; refused outside an executor';

create or replace function peer._arm_statement_timeout(ms integer) returns void
    language c strict as 'MODULE_PATHNAME', 'aquapeer_arm_statement_timeout';
comment on function peer._arm_statement_timeout(integer) is 'arm (ms > 0) or disarm (0) an executor''s statement timeout; refused outside an executor';

create or replace function peer._register_worker() returns integer
    language c as 'MODULE_PATHNAME', 'aquapeer_register_worker_sql';

create or replace function peer._launcher_hold(hold boolean) returns boolean
    language c strict as 'MODULE_PATHNAME', 'aquapeer_launcher_hold';

create or replace function peer._launcher_check() returns void
    language c as 'MODULE_PATHNAME', 'aquapeer_launcher_check';

create or replace function peer._start_executor(role oid, nonce text) returns void
    language c strict as 'MODULE_PATHNAME', 'aquapeer_start_executor';

-- Loading the Python payload -------------------------------------------------
-- Puts this version's payload first on sys.path once per backend, refuses
-- to run with a module of the payload that the session already imported
-- from elsewhere, and checks the versions agree.
create or replace function peer._bootstrap() returns void
language plpython3u as $$
import os
import sys

if 'aquapeer' in GD:
    return

class PayloadError(plpy.Error):
    """Reported by PL/Python as "aquapeer: <message>" (it prefixes the class name)."""
PayloadError.__name__ = "aquapeer"

def fail(message, detail, hint, sqlstate):
    error = PayloadError(message)
    error.detail, error.hint, error.sqlstate = detail, hint, sqlstate
    raise error

payload = plpy.execute("select peer._payload_dir() as d")[0]["d"]
extversion = plpy.execute(
    "select extversion from pg_catalog.pg_extension where extname = 'aquapeer'")[0]["extversion"]
if not os.path.isfile(os.path.join(payload, "aquapeer", "__init__.py")):
    fail("its Python payload is not installed",
         f"{payload}/aquapeer/__init__.py does not exist",
         "Run `make install` in the aquapeer source tree (as root): it installs the "
         "payload for the interpreter PL/Python uses into that directory.",
         "58P01")

def top_level_names(directory):
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if entry.endswith(".py"):
            yield entry[:-3]
        elif entry.endswith(".so"):
            yield entry.split(".")[0]
        elif os.path.isdir(path) and "." not in entry and entry not in ("bin", "__pycache__"):
            yield entry

root = os.path.realpath(payload) + os.sep
for name in sorted(set(top_level_names(payload))):
    module = sys.modules.get(name)
    where = getattr(module, "__file__", None) if module else None
    if where and not os.path.realpath(where).startswith(root):
        fail(f'Python module "{name}" is already loaded in this session from {where}, '
             f"but aquapeer needs its own copy from {payload}",
             "PL/Python shares one interpreter per session, and a module cannot be loaded twice.",
             "Something in this session imported it before aquapeer did, for instance another "
             "PL/Python function. Use aquapeer in a new session before importing that module elsewhere.",
             "55000")
if payload in sys.path:
    sys.path.remove(payload)
sys.path.insert(0, payload)

import aquapeer
if aquapeer.__version__ != extversion:
    fail(f"its Python payload is version {aquapeer.__version__} but the extension is {extversion}",
         f"loaded from {os.path.dirname(aquapeer.__file__)}",
         "Run `make install` for this version, or ALTER EXTENSION aquapeer UPDATE.",
         "55000")
from aquapeer import sqlapi
GD["aquapeer"] = sqlapi
$$;
comment on function peer._bootstrap() is 'load this version''s Python payload into the session, once, checking that the versions agree';

create or replace function peer.version() returns text
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
import aquapeer
return aquapeer.__version__
$$;
comment on function peer.version() is 'the version of the loaded aquapeer Python package';

-- The worker -----------------------------------------------------------------
create or replace procedure peer.worker_main()
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].worker_main()
$$;
comment on procedure peer.worker_main() is 'the loop of this database''s aquapeer worker, which the launcher or peer.start_worker() runs';

create or replace procedure peer.executor_main()
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].executor_main()
$$;
comment on procedure peer.executor_main() is 'the loop of an aquapeer executor; refuses to run anywhere else';

create or replace function peer._worker_pid() returns integer
language sql stable set search_path = pg_catalog, pg_temp as $$
    select pid from pg_stat_activity
    where backend_type = 'aquapeer worker' and datname = current_database()
    order by backend_start limit 1
$$;
comment on function peer._worker_pid() is 'the pid of this database''s aquapeer worker, or null';

create or replace function peer._worker_answers() returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].worker_answers()
$$;

-- Wait up to timeout for the worker to answer (running) or to be gone (not
-- running); return its pid, or null.
create or replace function peer._await_worker(running boolean, timeout interval) returns integer
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    deadline timestamptz := clock_timestamp() + timeout;
    pid integer;
begin
    loop
        perform pg_stat_clear_snapshot();
        pid := peer._worker_pid();
        if (running and pid is not null and peer._worker_answers())
           or (not running and pid is null)
           or clock_timestamp() > deadline then
            return pid;
        end if;
        if running then
            perform peer._launcher_check();
        end if;
        perform pg_sleep(0.02);
    end loop;
end
$$;
comment on function peer._await_worker(boolean, interval) is 'wait up to timeout for the worker to answer (running) or to be gone; its pid, or null';

create or replace function peer.start_worker() returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    pid integer;
begin
    -- One start at a time per database.
    perform pg_advisory_xact_lock(hashtext('aquapeer worker start'), 0);
    pid := peer._worker_pid();
    if pid is not null then
        return format('already running (pid %s)', pid);
    end if;
    if not peer._launcher_hold(false) then
        perform peer._register_worker();
    end if;
    pid := peer._await_worker(true, '10 s');
    if pid is null or not peer._worker_answers() then
        raise exception 'the aquapeer worker for database "%" did not start within 10 s', current_database()
            using hint = 'See the server log for the reason.';
    end if;
    return format('started (pid %s)', pid);
end
$$;
comment on function peer.start_worker() is 'start this database''s aquapeer worker; a no-op when it runs';

create or replace function peer.stop_worker() returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    pid integer;
begin
    perform pg_advisory_xact_lock(hashtext('aquapeer worker start'), 0);
    -- A preloaded worker stays stopped until peer.start_worker() or the next server start.
    perform peer._launcher_hold(true);
    pid := peer._worker_pid();
    if pid is null then
        return 'not running';
    end if;
    perform pg_terminate_backend(pid);
    if peer._await_worker(false, '5 s') is not null then
        raise exception 'the aquapeer worker (pid %) did not stop within 5 s', pid
            using hint = 'See the server log; pg_terminate_backend() it again if it persists.';
    end if;
    return format('stopped (pid %s)', pid);
end
$$;
comment on function peer.stop_worker() is 'stop this database''s aquapeer worker; a no-op when it is not running';

-- The control channel --------------------------------------------------------
create or replace function peer.ping_worker() returns interval
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return f"{GD['aquapeer'].ping_worker():.6f} seconds"
$$;
comment on function peer.ping_worker() is 'round trip to this database''s worker over the control channel';

create or replace function peer.nudge_worker() returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].nudge_worker()
$$;
comment on function peer.nudge_worker() is 'wake the worker (background workers cannot LISTEN); false when it is not running';

create or replace function peer.worker_status(
    out pid integer, out state text, out started_at timestamptz, out database name,
    out python_version text, out aiortc_version text, out aquapeer_version text,
    out loop_lag_max_ms double precision, out executors jsonb, out requests bigint, out wakeups bigint,
    out problem text)
returns setof record
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].worker_status()
$$;
comment on function peer.worker_status() is
    'this database''s aquapeer worker: state, versions, loop lag, and what keeps it from reaching friends';

-- Executors ------------------------------------------------------------------
create or replace function peer._run_in_executor(role oid, fn oid, arg jsonb, seconds double precision) returns jsonb
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].run_in_executor(role, fn, arg, seconds)
$$;

create or replace function peer.run_in_executor(role regrole, fn regprocedure, arg jsonb,
                                     timeout interval default '30 s') returns jsonb
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    if not (select rolcanlogin from pg_roles where oid = role) then
        raise exception 'role "%" cannot log in, so no executor can connect as it', role
            using errcode = '42501',
                  hint = format('Executors connect as the role itself: ALTER ROLE %s LOGIN '
                                '(without a password it still cannot log in from outside).', role);
    end if;
    if timeout <= '0'::interval then
        raise exception 'timeout must be positive, not %', timeout using errcode = '22023';
    end if;
    return peer._run_in_executor(role, fn, arg, extract(epoch from timeout)::float8);
end
$$;
comment on function peer.run_in_executor(regrole, regprocedure, jsonb, interval) is
    'run fn(arg) in an aquapeer executor connected as role, bounded by timeout (superusers only)';

-- A restored row replaces the default one, whatever the columns, so that
-- upgrades adding settings need not list them all again.
create or replace function peer._config_single_row() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    -- pg_dump restores this table after CREATE EXTENSION made the default row.
    delete from peer.config;
    return new;
end
$$;
comment on function peer._config_single_row() is 'keeps peer.config to one row: a restored row replaces the default one';
create or replace trigger config_single_row before insert on peer.config
    for each row execute function peer._config_single_row();
