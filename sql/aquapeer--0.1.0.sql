-- aquapeer 0.1.0: the extension, its worker, the control channel and executors.
\echo Use "CREATE EXTENSION aquapeer CASCADE" to load this file. \quit

-- Roles are cluster-wide and outlive DROP EXTENSION: create them only once.
do $$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'aquapeer_admin') then
        create role aquapeer_admin nologin;
    end if;
end
$$;

-- Executors connect as other roles and must reach their few entry points.
grant usage on schema peer to public;

-- Settings, one row.  Kept by pg_dump; restoring replaces the default row.
create table peer.config (
    singleton boolean primary key default true check (singleton),
    executor_pool_size integer not null default 2
        check (executor_pool_size between 0 and 64),
    executor_idle_timeout interval not null default '60 s'
        check (executor_idle_timeout > '0'::interval)
);
comment on table peer.config is 'aquapeer settings (one row); the worker reads them when it starts';

create function peer._config_single_row() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    -- pg_dump restores this table after CREATE EXTENSION made the default row.
    if exists (select from peer.config) then
        update peer.config set
            executor_pool_size = new.executor_pool_size,
            executor_idle_timeout = new.executor_idle_timeout;
        return null;
    end if;
    return new;
end
$$;
create trigger config_single_row before insert on peer.config
    for each row execute function peer._config_single_row();
insert into peer.config default values;
select pg_catalog.pg_extension_config_dump('peer.config', '');
revoke all on peer.config from public;
grant select on peer.config to aquapeer_admin;
grant update on peer.config to aquapeer_admin;

-- C helpers ------------------------------------------------------------------

create function peer._library_version() returns text
    language c strict as 'MODULE_PATHNAME', 'aquapeer_library_version';
create function peer._payload_dir() returns text
    language c strict as 'MODULE_PATHNAME', 'aquapeer_payload_dir';
create function peer._should_stop() returns text
    language c as 'MODULE_PATHNAME', 'aquapeer_should_stop';
create function peer._check_interrupts() returns void
    language c as 'MODULE_PATHNAME', 'aquapeer_check_interrupts';
create function peer._executor_nonce() returns text
    language c as 'MODULE_PATHNAME', 'aquapeer_executor_nonce';
create function peer._arm_statement_timeout(ms integer) returns void
    language c strict as 'MODULE_PATHNAME', 'aquapeer_arm_statement_timeout';
create function peer._register_worker() returns integer
    language c as 'MODULE_PATHNAME', 'aquapeer_register_worker_sql';
create function peer._launcher_hold(hold boolean) returns boolean
    language c strict as 'MODULE_PATHNAME', 'aquapeer_launcher_hold';
create function peer._launcher_check() returns void
    language c as 'MODULE_PATHNAME', 'aquapeer_launcher_check';
create function peer._start_executor(role oid, nonce text) returns void
    language c strict as 'MODULE_PATHNAME', 'aquapeer_start_executor';
revoke all on function peer._register_worker(), peer._launcher_hold(boolean), peer._launcher_check(),
    peer._start_executor(oid, text) from public;

-- Loading the Python payload -------------------------------------------------

-- Puts this version's payload first on sys.path once per backend, refuses
-- to run with a module of the payload that the session already imported
-- from elsewhere, and checks the versions agree.
create function peer._bootstrap() returns void
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

-- CREATE EXTENSION fails here, clearly, when the payload is missing or of another version.
select peer._bootstrap();

create function peer.version() returns text
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
import aquapeer
return aquapeer.__version__
$$;
comment on function peer.version() is 'the version of the loaded aquapeer Python package';

-- The worker -----------------------------------------------------------------

create procedure peer.worker_main()
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].worker_main()
$$;
revoke all on procedure peer.worker_main() from public;

create procedure peer.executor_main()
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].executor_main()
$$;
comment on procedure peer.executor_main() is 'the loop of an aquapeer executor; refuses to run anywhere else';

create function peer._worker_pid() returns integer
language sql stable set search_path = pg_catalog, pg_temp as $$
    select pid from pg_stat_activity
    where backend_type = 'aquapeer worker' and datname = current_database()
    order by backend_start limit 1
$$;

create function peer._worker_answers() returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].worker_answers()
$$;
revoke all on function peer._worker_answers() from public;

-- Wait up to timeout for the worker to answer (running) or to be gone (not
-- running); return its pid, or null.
create function peer._await_worker(running boolean, timeout interval) returns integer
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

create function peer.start_worker() returns text
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

create function peer.stop_worker() returns text
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

revoke all on function peer.start_worker(), peer.stop_worker() from public;
grant execute on function peer.start_worker(), peer.stop_worker() to aquapeer_admin;

-- The control channel --------------------------------------------------------

create function peer.ping_worker() returns interval
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return f"{GD['aquapeer'].ping_worker():.6f} seconds"
$$;
comment on function peer.ping_worker() is 'round trip to this database''s worker over the control channel';

create function peer.nudge_worker() returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].nudge_worker()
$$;
comment on function peer.nudge_worker() is 'wake the worker (background workers cannot LISTEN); false when it is not running';

create function peer.worker_status(
    out pid integer, out state text, out started_at timestamptz, out database name,
    out python_version text, out aiortc_version text, out aquapeer_version text,
    out loop_lag_max_ms double precision, out executors jsonb, out requests bigint, out wakeups bigint)
returns setof record
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].worker_status()
$$;
comment on function peer.worker_status() is 'this database''s aquapeer worker: state, versions, loop lag';

revoke all on function peer.ping_worker(), peer.nudge_worker(), peer.worker_status() from public;
grant execute on function peer.ping_worker(), peer.nudge_worker(), peer.worker_status() to aquapeer_admin;

-- Executors ------------------------------------------------------------------

create function peer._run_in_executor(role oid, fn oid, arg jsonb, seconds double precision) returns jsonb
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].run_in_executor(role, fn, arg, seconds)
$$;

create function peer.run_in_executor(role regrole, fn regprocedure, arg jsonb,
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
revoke all on function peer.run_in_executor(regrole, regprocedure, jsonb, interval),
    peer._run_in_executor(oid, oid, jsonb, double precision) from public;

-- Identity ---------------------------------------------------------------------

do $$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'aquapeer_friend') then
        create role aquapeer_friend nologin;
    end if;
end
$$;
comment on role aquapeer_friend is 'default role friends act as; no privileges of its own';

-- This database's identity: its peer id and the secret (current private key
-- and key chain).  pg_dump keeps it, so a restored copy is the same peer
-- (peer.reset_identity() makes a copy a new one).
create table peer.identity (
    singleton boolean primary key default true check (singleton),
    peer_id text not null,
    secret bytea not null,
    created_at timestamptz not null default now(),
    rotated_at timestamptz
);
revoke all on peer.identity from public;

create function peer._identity_single_row() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    -- pg_dump restores the dumped identity after CREATE EXTENSION made a new one.
    if exists (select from peer.identity) then
        update peer.identity set peer_id = new.peer_id, secret = new.secret,
            created_at = new.created_at, rotated_at = new.rotated_at;
        return null;
    end if;
    return new;
end
$$;
create trigger identity_single_row before insert on peer.identity
    for each row execute function peer._identity_single_row();
select pg_catalog.pg_extension_config_dump('peer.identity', '');

-- Servers and ICE settings -----------------------------------------------------

create table peer.signal_server (
    id serial primary key,
    url text not null unique check (url ~ '^wss?://[^/\s]+'),
    priority integer not null default 100
);
create table peer.stun_server (
    id serial primary key,
    url text not null unique check (url ~ '^stuns?:[^\s]+$'),
    priority integer not null default 100
);
create table peer.turn_server (
    id serial primary key,
    url text not null unique check (url ~ '^turns?:[^\s]+$'),
    username text,
    credential text,
    priority integer not null default 100
);
comment on table peer.signal_server is 'rendezvous servers; the one peer.config names, then the others by priority';
comment on table peer.stun_server is 'STUN servers; aiortc uses one at a time, the worker moves on to the next when ICE fails';
comment on table peer.turn_server is 'TURN servers; the credential is readable only by the extension owner';
select pg_catalog.pg_extension_config_dump('peer.signal_server', '');
select pg_catalog.pg_extension_config_dump('peer.stun_server', '');
select pg_catalog.pg_extension_config_dump('peer.turn_server', '');
select pg_catalog.pg_extension_config_dump('peer.signal_server_id_seq', '');
select pg_catalog.pg_extension_config_dump('peer.stun_server_id_seq', '');
select pg_catalog.pg_extension_config_dump('peer.turn_server_id_seq', '');
revoke all on peer.signal_server, peer.stun_server, peer.turn_server from public;
grant select, insert, update, delete on peer.signal_server, peer.stun_server to aquapeer_admin;
grant select (id, url, username, priority), insert, update, delete on peer.turn_server to aquapeer_admin;
grant usage on sequence peer.signal_server_id_seq, peer.stun_server_id_seq, peer.turn_server_id_seq
    to aquapeer_admin;

alter table peer.config
    add column signal_server_id integer references peer.signal_server on delete set null,
    add column stun_server_id integer references peer.stun_server on delete set null,
    add column turn_server_id integer references peer.turn_server on delete set null,
    add column ice_host_addresses inet[],
    add column ice_transport_policy text not null default 'all'
        check (ice_transport_policy in ('all', 'relay')),
    add column friend_request_limit integer not null default 1000
        check (friend_request_limit between 0 and 1000000);
comment on column peer.config.ice_host_addresses is
    'host candidates the worker offers (null: every interface address; loopback only when listed)';
comment on column peer.config.ice_transport_policy is 'relay: never reveal host addresses to friends';

create or replace function peer._config_single_row() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    -- pg_dump restores this table after CREATE EXTENSION made the default row.
    if exists (select from peer.config) then
        update peer.config set
            executor_pool_size = new.executor_pool_size,
            executor_idle_timeout = new.executor_idle_timeout,
            signal_server_id = new.signal_server_id,
            stun_server_id = new.stun_server_id,
            turn_server_id = new.turn_server_id,
            ice_host_addresses = new.ice_host_addresses,
            ice_transport_policy = new.ice_transport_policy,
            friend_request_limit = new.friend_request_limit;
        return null;
    end if;
    return new;
end
$$;

-- Friends ------------------------------------------------------------------------

create table peer.friend (
    name text primary key check (name ~ '^[a-z0-9_-]{1,63}$'),
    peer_id text not null unique,
    chain bytea not null,
    signal_urls text[] not null default '{}',
    state text not null default 'accepted' check (state in ('accepted', 'blocked')),
    role name not null default 'aquapeer_friend',
    auto_connect boolean not null default true,
    signal_server_id integer references peer.signal_server on delete set null,
    stun_server_id integer references peer.stun_server on delete set null,
    added_at timestamptz not null default now(),
    last_seen timestamptz
);
comment on table peer.friend is 'friends: their identities (key chains), the role they act as, and overrides';
select pg_catalog.pg_extension_config_dump('peer.friend', '');
revoke all on peer.friend from public;
grant select on peer.friend to aquapeer_admin;
grant update (auto_connect, signal_server_id, stun_server_id) on peer.friend to aquapeer_admin;

create view peer.friends as
    select name, peer_id, state, role, added_at, last_seen from peer.friend;
revoke all on peer.friends from public;
grant select on peer.friends to aquapeer_admin;

-- Connection attempts from strangers, bounded (oldest dropped first).
create table peer.friend_request (
    peer_id text primary key,
    claimed_name text not null default '',
    chain bytea not null,
    first_seen timestamptz not null default now(),
    last_seen timestamptz not null default now(),
    attempts integer not null default 1
);
revoke all on peer.friend_request from public;
create view peer.friend_requests as
    select peer_id, claimed_name as name, first_seen, attempts from peer.friend_request;
revoke all on peer.friend_requests from public;
grant select on peer.friend_requests to aquapeer_admin;

-- The API: identity, friends, connections -----------------------------------------

create function peer._new_identity() returns void
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].new_identity()
$$;
revoke all on function peer._new_identity() from public;
select peer._new_identity();

create function peer.whoami() returns text
language sql stable security definer set search_path = pg_catalog, pg_temp
as $$ select peer_id from peer.identity $$;
comment on function peer.whoami() is 'this database''s peer id (public)';


-- Each of these calls aquapeer.sqlapi.<name>(**arguments).
create function peer.invite() returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].invite()
$$;
comment on function peer.invite() is 'a one-line invite (peer id, public key, signaling servers) to give a friend';

create function peer.rotate_identity() returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].rotate_identity()
$$;
comment on function peer.rotate_identity() is 'replace the key pair, keep the peer id; friends accept the new key by its signature';

create function peer.reset_identity() returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].reset_identity()
$$;
comment on function peer.reset_identity() is 'make this database a new peer (for a restored or cloned copy); friends must add it again';

create function peer.add_friend(name text, invite text) returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].add_friend(name, invite)
$$;
comment on function peer.add_friend(text, text) is 'add a friend under a local name from its invite; returns its peer id';

create function peer.accept_friend(peer_id text, name text) returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].accept_friend(peer_id, name)
$$;
comment on function peer.accept_friend(text, text) is 'turn a friend request into a friend';

create function peer.remove_friend(name text) returns boolean
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].remove_friend(name)
$$;

create function peer.block(name text) returns boolean
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].block(name)
$$;
comment on function peer.block(text) is 'refuse a friend from now on (keeps the record; remove_friend forgets it)';

create function peer.set_friend_role(name text, role regrole) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if exists (select from pg_roles r
               where (r.rolsuper or r.rolbypassrls) and pg_has_role(role, r.oid, 'MEMBER')) then
        raise exception 'role "%" is or can become a superuser or a role that bypasses row-level security', role
            using errcode = '42501',
                  hint = 'Friends act as this role; give them a role with only the privileges they need.';
    end if;
    update peer.friend f set role = set_friend_role.role::name where f.name = set_friend_role.name;
    if not found then
        raise exception 'unknown friend "%"', name using errcode = '42704',
            hint = 'See select * from peer.friends.';
    end if;
end
$$;
comment on function peer.set_friend_role(text, regrole) is 'the role a friend acts as in executors';

create function peer.connect(name text, timeout interval default '15 s') returns text
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
seconds = plpy.execute(plpy.prepare("select extract(epoch from $1)::float8 as s", ["interval"]), [timeout])[0]["s"]
return GD["aquapeer"].connect(name, seconds)
$$;
comment on function peer.connect(text, interval) is 'connect to a friend (or reuse the connection); returns connected';

create function peer.reload_worker() returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].reload_worker()
$$;
comment on function peer.reload_worker() is 'make the worker take up changed servers and ICE settings (reconnects every friend)';

create function peer.disconnect(name text) returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].disconnect(name)
$$;

create function peer._connections(
    out friend text, out state text, out connected_since timestamptz, out rtt_ms double precision,
    out bytes_sent bigint, out bytes_received bigint, out local_candidate text,
    out remote_candidate text, out last_error text)
returns setof record
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].connections()
$$;
create view peer.connections as select * from peer._connections();
comment on view peer.connections is 'live connections to friends, read from the worker';

revoke all on function peer.invite(), peer.rotate_identity(), peer.reset_identity(),
    peer.add_friend(text, text), peer.accept_friend(text, text), peer.remove_friend(text),
    peer.block(text), peer.set_friend_role(text, regrole), peer.connect(text, interval),
    peer.disconnect(text), peer._connections(), peer.reload_worker() from public;
revoke all on peer.connections from public;
grant execute on function peer.invite(), peer.rotate_identity(),
    peer.add_friend(text, text), peer.accept_friend(text, text), peer.remove_friend(text),
    peer.block(text), peer.set_friend_role(text, regrole), peer.connect(text, interval),
    peer.disconnect(text), peer._connections(), peer.reload_worker() to aquapeer_admin;
grant select on peer.connections to aquapeer_admin;
