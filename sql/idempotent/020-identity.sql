-- This database's identity: keys, peer id, invites.

create or replace function peer._identity_single_row() returns trigger
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
comment on function peer._identity_single_row() is 'keeps peer.identity to one row: a restored identity replaces the one CREATE EXTENSION made';
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
return GD["aquapeer"].reset_identity()
$$;
comment on function peer.reset_identity() is 'make this database a new peer (for a restored or cloned copy); friends must add it again';
