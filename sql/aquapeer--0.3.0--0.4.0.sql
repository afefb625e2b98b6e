-- aquapeer 0.3.0 -> 0.4.0: faster bundles (no JIT, cheaper keeping of received trees).
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- The given ids and what lies below those of them held only as pending nodes, down to what the
-- store holds, each with whether it is pending: the walk bundle._lacking and bundle._promote
-- share.  It descends through pending nodes only, and leaves out the nodes of the head tree
-- (bundle.head_node), which are in the store with everything below them: of the 65,536 children
-- of the 256 fan nodes a pull of 1,000 scattered rows receives, about 1,000 are new, and probing
-- the store for all of them took half a second, twice; the head tree's index is far smaller.
-- Probes are by key ("limit 1", scalar subqueries): within one long transaction (an import) the
-- store has no statistics, and a join hashing all of it on each call would be quadratic.
create index head_node_id on bundle.head_node (bundle, id);
create function bundle._pending_walk(bundle_name text, ids text[]) returns table (id text, pending boolean)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    with recursive walk(id) as (
        select i from unnest(ids) i
        where (select h.id from bundle.head_node h where h.bundle = bundle_name and h.id = i limit 1) is null
        union
        select c.child from walk w
        cross join lateral (select p.data from bundle.pending p where p.bundle = bundle_name and p.id = w.id
                            limit 1) p
        cross join lateral bundle._children(p.data) c(child)
        where (select h.id from bundle.head_node h where h.bundle = bundle_name and h.id = c.child limit 1) is null
    )
    select w.id, (select p.id from bundle.pending p where p.bundle = bundle_name and p.id = w.id) is not null
    from walk w
$$;

-- Of the given ids, those the bundle lacks, and the children of those held only as pending
-- nodes that it lacks in turn (what a pull that broke off still has to ask for).
create or replace function bundle._lacking(bundle_name text, ids text[]) returns setof text
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    select w.id from bundle._pending_walk(bundle_name, ids) w
    where not w.pending and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = w.id) is null
$$;

-- Move the pending nodes below the given roots to bundle.object, once nothing below them is missing.
create or replace function bundle._promote(bundle_name text, roots text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    moving text[];
    missing text;
begin
    -- Garbage collection skips a bundle whose row is locked, so nothing checked here is
    -- collected before this transaction ends.
    perform from bundle.bundle b where b.name = bundle_name for key share;
    select array_agg(w.id) filter (where w.pending),
           min(w.id) filter (where not w.pending
                             and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = w.id) is null)
        into moving, missing
    from bundle._pending_walk(bundle_name, roots) w;
    if missing is not null then
        raise exception 'bundle "%" lacks object % of the commits received', bundle_name, missing
            using errcode = 'XX001', hint = 'Pull again: what was received is kept, and only what is missing is fetched.';
    end if;
    with moved as (
        delete from bundle.pending p where p.bundle = bundle_name and p.id = any (moving)
        returning p.*
    )
    insert into bundle.object select * from moved on conflict do nothing;
end
$$;

revoke all on function bundle._pending_walk(text, text[]) from public;

-- No foreign keys to bundle.bundle on the tables that take a row per object, per tracked row or
-- per changed key: checking one per row inserted took 3 s of a 1,000,000-row commit for
-- bundle.object and as much for bundle.head_row, and as long again in a clone.  What writes to
-- them locks the bundle's row instead (for key share, as the checks did; bundle.commit,
-- bundle.checkout and bundle._integrate lock it for update), and a trigger deletes a bundle's
-- rows with it.
alter table bundle.object drop constraint object_bundle_fkey;
alter table bundle.pending drop constraint pending_bundle_fkey;
alter table bundle.head_row drop constraint head_row_bundle_fkey;
alter table bundle.head_node drop constraint head_node_bundle_fkey;
alter table bundle.changed_key drop constraint changed_key_bundle_fkey;

create function bundle._forget() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    delete from bundle.changed_key k using gone g where k.bundle = g.name;
    delete from bundle.head_row h using gone g where h.bundle = g.name;
    delete from bundle.head_node h using gone g where h.bundle = g.name;
    delete from bundle.pending p using gone g where p.bundle = g.name;
    delete from bundle.object o using gone g where o.bundle = g.name;  -- and bundle.commit, by its foreign keys
    return null;
end
$$;
revoke all on function bundle._forget() from public;
create trigger forget after delete on bundle.bundle referencing old table as gone
    for each statement execute function bundle._forget();
-- Renaming would leave those rows behind.
create function bundle._keep_name() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    raise exception 'bundle "%" cannot be renamed', old.name using errcode = '0A000',
        hint = 'Export it and import it under another name, or create a new bundle.';
end
$$;
revoke all on function bundle._keep_name() from public;
create trigger keep_name before update of name on bundle.bundle
    for each row when (old.name is distinct from new.name) execute function bundle._keep_name();

-- Keep objects received for a bundle, each checked against its id: blobs in bundle.object,
-- tree nodes in bundle.pending until bundle._promote.  Returns what the bundle still lacks below
-- the nodes (what to ask for next).
create or replace function bundle._keep(bundle_name text, ids text[], datas bytea[]) returns setof text
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    bad record;
begin
    select i.id, encode(sha256(i.data), 'hex') as actual into bad
    from unnest(ids, datas) i(id, data) where i.id is distinct from encode(sha256(i.data), 'hex') limit 1;
    if found then
        raise exception 'object % does not match its content (it hashes to %)', bad.id, bad.actual
            using errcode = 'XX001', hint = 'The sender altered or damaged it; nothing of it was kept.';
    end if;
    -- Locked as the foreign key did: the bundle stays until this transaction ends, and retention
    -- passes it by meanwhile.
    perform from bundle.bundle b where b.name = bundle_name for key share;
    if not found then
        raise exception 'bundle "%" does not exist', bundle_name using errcode = '42704';
    end if;
    -- At most hourly: retention must not collect what a running pull keeps, and a new row
    -- version per call would pile up in a long transaction (an import) and slow every lookup of
    -- the bundle.
    update bundle.bundle set loose_since = now()
    where name = bundle_name and (loose_since is null or loose_since < now() - interval '1 hour');
    -- One statement: a node's children never come in the same batch as the node (they are
    -- asked for after it is kept), so what it inserts need not be visible to _lacking.
    return query
        with received as materialized (
            select i.id, bundle._kind(i.data) as kind, i.data from unnest(ids, datas) i(id, data)
        ), blobs as (
            insert into bundle.object select bundle_name, r.id, 'blob', r.data from received r
            where r.kind = 'blob' on conflict do nothing
        ), nodes as (
            insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
            where r.kind <> 'blob' on conflict do nothing
        )
        select * from bundle._lacking(bundle_name, array(
            select c.child from received r cross join lateral bundle._children(r.data) c(child)
            where r.kind <> 'blob'));
end
$$;

-- Change capture: each statement on a tracked table records the keys it wrote.
create or replace function bundle._capture() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set datestyle = 'ISO, YMD' set intervalstyle = 'iso_8601'
set extra_float_digits = 1 set bytea_output = 'hex' set jit = off
as $$
declare
    key_expression text := (select string_agg(format('t.%I::text', k), ', ' order by n)
                            from unnest(TG_ARGV) with ordinality u(k, n));
begin
    -- A checkout (bundle.checkout sets bundle.checking_out) writes exactly its target's rows, so
    -- they are no change to its bundle, unless a user trigger alters them on the way in or
    -- another bundle tracks the table too.
    if coalesce(current_setting('bundle.checking_out', true), '') <> '' and not bundle._has_user_triggers(TG_RELID)
       and not exists (select from bundle.tracked k where k.relation = TG_RELID
                       and k.bundle <> current_setting('bundle.checking_out', true)) then
        return null;
    end if;
    -- For every bundle tracking the table (also one comparing it whole: a commit running
    -- meanwhile may not see this write, and must leave its key for the next one), locked as the
    -- foreign key did, so that none is deleted before these keys are in.
    perform from bundle.bundle b where b.name in (select k.bundle from bundle.tracked k where k.relation = TG_RELID)
        for key share;
    if TG_OP in ('INSERT', 'UPDATE') then
        execute format('insert into bundle.changed_key select b.bundle, %s::regclass, jsonb_build_array(%s) '
                       'from new_rows t, bundle.tracked b where b.relation = %s::regclass on conflict do nothing',
                       TG_RELID, key_expression, TG_RELID);
    end if;
    if TG_OP in ('UPDATE', 'DELETE') then
        execute format('insert into bundle.changed_key select b.bundle, %s::regclass, jsonb_build_array(%s) '
                       'from old_rows t, bundle.tracked b where b.relation = %s::regclass on conflict do nothing',
                       TG_RELID, key_expression, TG_RELID);
    end if;
    return null;
end
$$;

-- Tree nodes are kilobytes of hex ids (a fan node of a large table 17 kB): pglz took 70 ms to
-- compress the 256 fan nodes an incremental pull of 1,000 rows receives.  lz4 (PostgreSQL
-- built with it, as Debian's is) compresses them ten times faster; rows stored before stay
-- readable as they are.
do $$
begin
    if exists (select from pg_settings where name = 'default_toast_compression' and 'lz4' = any (enumvals)) then
        alter table bundle.object alter column data set compression lz4;
        alter table bundle.pending alter column data set compression lz4;
    end if;
end
$$;

-- No JIT in bundle functions.  Their statements look expensive to the planner (set-returning
-- functions it guesses at 1,000 rows, arrays it cannot see into) while most touch a few
-- thousand rows; compiling them took 100-150 ms a statement, more than running them (an
-- incremental pull of 1,000 rows spent 1.5 s of 3.5 s compiling).  Functions without a SET
-- clause stay so, or the planner could no longer inline them into a tree walk.  A function
-- added later that runs statements of its own must say set jit = off itself.
do $$
declare
    f regprocedure;
begin
    for f in select p.oid::regprocedure from pg_proc p
             where (p.pronamespace = 'bundle'::regnamespace and p.proconfig is not null)
                or p.oid in ('peer.pull_bundle(text, text, boolean)'::regprocedure,
                             'peer.push_bundle(text, text)'::regprocedure,
                             'peer._serve_bundle_head(text, text, boolean)'::regprocedure,
                             'peer._serve_bundle_commits(text, text, boolean, text[])'::regprocedure,
                             'peer._serve_bundle_objects(text, text, boolean, text[])'::regprocedure) loop
        execute format('alter function %s set jit = off', f);
    end loop;
end
$$;
