-- This database's identity: keys, peer id, invites.

create or replace function peer._identity_single_row() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    -- pg_dump restores the dumped identity after CREATE EXTENSION made a new one.
    -- The copy is now that peer too: marked, so that its worker stays offline
    -- until someone says which of the two goes on (peer.keep_identity()).
    if exists (select from peer.identity) then
        update peer.identity set peer_id = new.peer_id, secret = new.secret,
            created_at = new.created_at, rotated_at = new.rotated_at;
        insert into peer.identity_restored (peer_id) values (new.peer_id)
            on conflict (singleton) do update set peer_id = excluded.peer_id, restored_at = excluded.restored_at;
        return null;
    end if;
    return new;
end
$$;
comment on function peer._identity_single_row() is
    'keeps peer.identity to one row: a restored identity replaces the one CREATE EXTENSION made, and marks the copy (peer.identity_restored)';
create or replace trigger identity_single_row before insert on peer.identity
    for each row execute function peer._identity_single_row();

-- Each of these calls aquapeer.sqlapi.<name>(**arguments).
create or replace function peer._new_identity() returns void
language plpython3u as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
GD["aquapeer"].new_identity()
$$;

create or replace function peer.whoami() returns text
language sql stable security definer set search_path = pg_catalog, pg_temp
as $$ select peer_id from peer.identity $$;
comment on function peer.whoami() is 'this database''s peer id (public)';

create or replace function peer.invite() returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].invite()
$$;
comment on function peer.invite() is 'a one-line invite (peer id, public key, signaling servers) to give a friend';

create or replace function peer.rotate_identity() returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].rotate_identity()
$$;
comment on function peer.rotate_identity() is 'replace the key pair, keep the peer id; friends accept the new key by its signature';

create or replace function peer.reset_identity() returns text
language plpython3u security definer set search_path = pg_catalog, pg_temp as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
peer_id = GD["aquapeer"].reset_identity()
# A new peer is no copy of another: the worker goes online, numbering messages in a new epoch.
if plpy.execute("delete from peer.identity_restored returning 1"):
    plpy.execute("delete from peer.stream_epoch")
return peer_id
$$;
comment on function peer.reset_identity() is 'make this database a new peer (for a restored or cloned copy); friends must add it again';

-- A restored copy goes on as the peer it was dumped from (docs/moving.md).
create or replace function peer.keep_identity() returns text
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    kept text;
begin
    delete from peer.identity_restored returning peer_id into kept;
    if kept is null then
        raise exception 'this database was not restored from a dump, so there is no restored identity to keep'
            using errcode = '55000',
                  hint = 'peer.keep_identity() is the step after pg_restore; this database is peer '
                         || peer.whoami() || ' already.';
    end if;
    -- The restored outbox is numbered again in a new epoch, drawn when the worker
    -- restarts on the data as restored (a worker may have drawn one while pg_restore ran).
    delete from peer.stream_epoch;
    return kept;
end
$$;
comment on function peer.keep_identity() is
    'after pg_restore: this copy replaces the peer it was dumped from (which must stop) and goes online as it';
