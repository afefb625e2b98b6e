-- Links to friends through the worker.

create or replace function peer.connect(name text, timeout interval default '15 s') returns text
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
seconds = plpy.execute(plpy.prepare("select extract(epoch from $1)::float8 as s", ["interval"]), [timeout])[0]["s"]
return GD["aquapeer"].connect(name, seconds)
$$;
comment on function peer.connect(text, interval) is 'connect to a friend (or reuse the connection); returns connected';

create or replace function peer.reload_worker() returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].reload_worker()
$$;
comment on function peer.reload_worker() is 'make the worker take up changed servers and ICE settings (reconnects every friend)';

create or replace function peer.disconnect(name text) returns boolean
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].disconnect(name)
$$;
comment on function peer.disconnect(text) is 'close the connection to a friend; false when there was none';

create or replace function peer._connections(
    out friend text, out state text, out connected_since timestamptz, out rtt_ms double precision,
    out bytes_sent bigint, out bytes_received bigint, out local_candidate text,
    out remote_candidate text, out last_error text, out protocol integer,
    out frames_refused bigint, out last_refusal text)
returns setof record
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].connections()
$$;

create or replace view peer.connections as select * from peer._connections();
comment on view peer.connections is 'live connections to friends, read from the worker';
