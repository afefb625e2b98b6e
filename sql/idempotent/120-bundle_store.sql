-- Keeping objects that arrive from friends or an export, and the store's upkeep.

-- Commit documents received for a bundle, each checked (its id, its author's signature, its
-- tree and parents present) and kept in parent order; returns how many were new.
create or replace function bundle._keep_commits(bundle_name text, documents jsonb) returns integer
language plpython3u set search_path = pg_catalog, pg_temp set jit = off as $$
if "aquapeer" not in GD:
    plpy.execute("select peer._bootstrap()")
return GD["aquapeer"].bundle_keep_commits(bundle_name, documents)
$$;

-- Describe, adopt, export, import -------------------------------------------------------------
-- A bundle's tracked tables as another database needs them to take the bundle in (the header of
-- bundle.export, and what a pull's server sends): relation as regclass prints it qualified, the
-- primary key columns in key order, every column with its type, by relation name.
create or replace function bundle._describe(bundle_name text) returns jsonb
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select coalesce(jsonb_agg(jsonb_build_object(
               'relation', t.relation::text,
               'key_columns', to_jsonb(t.key_columns),
               'columns', (select jsonb_agg(jsonb_build_array(a.attname, format_type(a.atttypid, a.atttypmod))
                                            order by a.attnum)
                           from pg_attribute a where a.attrelid = t.relation and a.attnum > 0 and not a.attisdropped))
           order by n.nspname, c.relname), '[]')
    from bundle._bundle(bundle_name) b
    join bundle.tracked t on t.bundle = b.name
    join pg_class c on c.oid = t.relation join pg_namespace n on n.oid = c.relnamespace
$$;

-- Take in a bundle described elsewhere (bundle._describe there): create it if missing and track
-- its tables here, once each exists with the same primary key and every described column with the
-- same type.  Local columns it does not describe must be nullable (or generated): checking out
-- writes them NULL, whatever their default, so that rows hash as the bundle's.  All differences
-- are reported at once.
create or replace function bundle._adopt(bundle_name text, tables jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    differences text[];
begin
    if jsonb_typeof(tables) is distinct from 'array' or exists (
        select from jsonb_array_elements(tables) e
        where jsonb_typeof(e->'relation') is distinct from 'string' or jsonb_typeof(e->'key_columns') is distinct from 'array'
           or jsonb_typeof(e->'columns') is distinct from 'array'
           or cardinality(parse_ident(e->>'relation')) <> 2) then
        raise exception 'not a description of bundle "%"''s tables: %', bundle_name, left(tables::text, 200)
            using errcode = '22023',
                  hint = 'Give what bundle._describe returns: [{"relation": "schema.table", "key_columns": [...], "columns": [[name, type], ...]}, ...].';
    end if;
    with theirs as (
        select e->>'relation' as relation, e->'columns' as columns,
               array(select jsonb_array_elements_text(e->'key_columns')) as key_columns,
               (select c.oid from pg_class c where c.oid = to_regclass(e->>'relation') and c.relkind in ('r', 'p')) as here
        from jsonb_array_elements(tables) e
    ), problems as (
        select t.relation, 0 as rank, '' as col, format('%s: no such table here', t.relation) as problem
        from theirs t where t.here is null
        union all
        select t.relation, 1, '', format('%s: primary key (%s) there, %s here', t.relation, array_to_string(t.key_columns, ', '),
                                         coalesce('(' || array_to_string(k.key_columns, ', ') || ')', 'none'))
        from theirs t cross join lateral (
            select array_agg(a.attname::text order by i.n) as key_columns
            from pg_index x cross join unnest(x.indkey) with ordinality i(attnum, n)
            join pg_attribute a on a.attrelid = x.indrelid and a.attnum = i.attnum
            where x.indrelid = t.here and x.indisprimary) k
        where t.here is not null and k.key_columns is distinct from t.key_columns
        union all
        select t.relation, 2, coalesce(j.name, j.our_name),
               case when j.our_name is null then format('%s.%s: %s there, missing here', t.relation, j.name, j.type)
                    when j.name is null then format('%s.%s: not there, and not null here', t.relation, j.our_name)
                    else format('%s.%s: %s there, %s here', t.relation, j.name, j.type, j.our_type) end
        from theirs t cross join lateral (
            select c.name, c.type, o.name as our_name, o.type as our_type, o.optional
            from (select x->>0 as name, x->>1 as type from jsonb_array_elements(t.columns) x) c
            full join (select a.attname::text as name, format_type(a.atttypid, a.atttypmod) as type,
                              not a.attnotnull or a.attgenerated <> '' as optional
                       from pg_attribute a where a.attrelid = t.here and a.attnum > 0 and not a.attisdropped) o
                 on o.name = c.name) j
        where t.here is not null
          and (j.our_name is null or (j.name is null and not j.optional) or (j.name is not null and j.type <> j.our_type))
    )
    select array_agg(problem order by relation, rank, col) into differences from problems;
    if differences is not null then
        raise exception 'the tables here do not match bundle "%": %', bundle_name, array_to_string(differences, '; ')
            using errcode = '42804',
                  hint = 'Create or alter the tables here to match: the same primary key and every column with the same '
                         'type (columns only this side has must be nullable); then try again.';
    end if;
    if not exists (select from bundle.bundle b where b.name = bundle_name) then
        perform bundle.create(bundle_name);
    end if;
    perform bundle.track(bundle_name, to_regclass(e->>'relation'))
    from jsonb_array_elements(tables) e
    where not exists (select from bundle.tracked k where k.bundle = bundle_name and k.relation = to_regclass(e->>'relation'));
end
$$;

-- The ids of the objects the bundle's commits reach, with their depth below a root (0: roots,
-- then table nodes, fan nodes, buckets, blobs): a walk over the stored tree nodes' children.
create or replace function bundle._reachable(bundle_name text) returns table (id text, depth integer)
language sql stable set search_path = pg_catalog, pg_temp set jit = off as $$
    with recursive walk(id, depth) as (
        select distinct c.tree, 0 from bundle.commit c where c.bundle = bundle_name
        union
        select ch.child, w.depth + 1 from walk w
        join bundle.object o on o.bundle = bundle_name and o.id = w.id and o.kind <> 'blob'
        cross join lateral bundle._children(o.data) ch(child)
    )
    select id, depth from walk
$$;

-- The bundle as a stream of JSON documents (docs/bundles.md, "Export format"): the header, the
-- objects children first, the commits parents first.  One query, so one snapshot; called in a
-- select list it is read row by row, so no part of it has to fit in memory at once.  (The parts
-- come in the order of the union's branches.)
create or replace function bundle.export(bundle_name text) returns setof jsonb
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select jsonb_build_object('type', 'bundle', 'format', 'aquapeer-bundle/2', 'name', b.name, 'head', b.head,
                              'tables', bundle._describe(b.name))
    from bundle._bundle(bundle_name) b
    union all
    (select jsonb_build_object('type', 'object', 'id', o.id, 'data', translate(encode(o.data, 'base64'), E'\n', ''))
     from bundle._reachable(bundle_name) r join bundle.object o on o.bundle = bundle_name and o.id = r.id
     order by r.depth desc, r.id)
    union all
    -- Parents first: by the longest way down from a commit nobody has as a parent, deepest first.
    (with recursive up(id, depth) as (
         select t.id, 0 from (select c.id from bundle.commit c where c.bundle = bundle_name
                              except select unnest(c.parents) from bundle.commit c where c.bundle = bundle_name) t
         union
         select p.parent, u.depth + 1 from up u
         join bundle.commit c on c.bundle = bundle_name and c.id = u.id
         cross join unnest(c.parents) p(parent)
     )
     select c.document from (select u.id, max(u.depth) as depth from up u group by u.id) u
     join bundle.commit c on c.bundle = bundle_name and c.id = u.id
     order by u.depth desc, c.id)
$$;
comment on function bundle.export(text) is
    'the bundle as a stream of JSON documents: header, objects, commits (docs/bundles.md, "Export format")';

-- Load one document of bundle.export's stream; returns 'new' when it added something here, else
-- 'known'.  The header names the bundle the later documents belong to (kept for the session in
-- the setting bundle.importing, undone with the transaction); a bundle that has no head here gets
-- the exported head once that commit is kept; bundle.checkout then applies it to the tables.
create or replace function bundle.import(document jsonb) returns text
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
declare
    state jsonb := nullif(current_setting('bundle.importing', true), '')::jsonb;
    target text := state->>'bundle';
    known boolean;
    our_head text;
begin
    if document->>'type' = 'bundle' then
        if document->>'format' is null or document->>'format' not in ('aquapeer-bundle/1', 'aquapeer-bundle/2')
           or jsonb_typeof(document->'name') is distinct from 'string' then
            raise exception 'not the header of a bundle export of format aquapeer-bundle/1 or /2: %', left(document::text, 200)
                using errcode = '22023', hint = 'It may come from a newer aquapeer; update this one.';
        end if;
        select b.head into our_head from bundle.bundle b where b.name = document->>'name';
        known := found;
        perform bundle._adopt(document->>'name', document->'tables');
        if our_head is not null and our_head is distinct from document->>'head' then
            raise notice 'bundle "%" exists here: its head stays at % (the import''s is %)', document->>'name', our_head,
                coalesce(document->>'head', 'none')
                using hint = 'The imported commits are kept; merge or check them out to use them.';
        end if;
        perform set_config('bundle.importing', jsonb_build_object(
            'bundle', document->>'name', 'head', case when our_head is null then document->'head' end)::text, false);
        return case when known then 'known' else 'new' end;
    end if;
    if target is null or document->>'type' not in ('object', 'commit') then
        raise exception '%', case when document->>'type' in ('object', 'commit')
                                  then 'a bundle document came before the bundle''s header'
                                  else format('not a bundle document: %s', left(document::text, 200)) end
            using errcode = '22023', hint = 'Import the documents of bundle.export in order, from its header on.';
    end if;
    if document->>'type' = 'object' then
        known := exists (select from bundle.object o where o.bundle = target and o.id = document->>'id')
                 or exists (select from bundle.pending p where p.bundle = target and p.id = document->>'id');
        -- Checked against its id even when known: a tampered copy is an error, not a no-op.
        perform bundle._keep(target, array[document->>'id'], array[decode(document->>'data', 'base64')]);
        return case when known then 'known' else 'new' end;
    end if;
    if coalesce(document->'commit'->>'tree', '') !~ '^[0-9a-f]{64}$' then
        raise exception 'not a commit document: %', left(document::text, 200) using errcode = '22023';
    end if;
    begin
        perform bundle._promote(target, array[document->'commit'->>'tree']);
    exception when data_corrupted then
        raise exception 'commit % of bundle "%" refers to objects the import did not bring', document->>'id', target
            using errcode = 'XX001', detail = sqlerrm,
                  hint = 'The export is incomplete or out of order (objects come before the commits); export it again.';
    end;
    known := bundle._keep_commits(target, jsonb_build_array(document)) = 0;
    if state->>'head' = document->>'id' then
        update bundle.bundle b set head = document->>'id' where b.name = target and b.head is null;
    end if;
    return case when known then 'known' else 'new' end;
end
$$;
comment on function bundle.import(jsonb) is
    'load one document of a bundle export, header first; returns new or known';

-- Garbage collection, run by retention: in each bundle whose loose objects are older than
-- peer.config.object_retention, drop the pending nodes and the objects no commit reaches.  A bundle
-- a transaction is keeping objects in or promoting a tree of right now (its row is locked, by the
-- foreign keys or bundle._promote) waits for the next run.
create or replace function bundle._collect_garbage() returns table (bundle_name text, pending bigint, objects bigint)
language plpgsql set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    for bundle_name in
        select b.name from bundle.bundle b, peer.config c where b.loose_since < now() - c.object_retention
        order by b.name for update of b skip locked
    loop
        delete from bundle.pending p where p.bundle = bundle_name;
        get diagnostics pending = row_count;
        delete from bundle.object o where o.bundle = bundle_name and o.kind <> 'commit'
            and not exists (select from bundle._reachable(bundle_name) r where r.id = o.id);
        get diagnostics objects = row_count;
        update bundle.bundle b set loose_since = null where b.name = bundle_name;
        return next;
    end loop;
end
$$;

-- A commit's root (null for null: the empty tree).
create or replace function bundle._tree(bundle_name text, commit_id text) returns text
language plpgsql stable set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    root text;
begin
    if commit_id is null then
        return null;
    end if;
    select c.tree into root from bundle.commit c where c.bundle = bundle_name and c.id = commit_id;
    if not found then
        raise exception 'bundle "%" has no commit %', bundle_name, commit_id using errcode = '42704',
            hint = 'See select * from bundle.log(name).';
    end if;
    return root;
end
$$;

-- Refuse a tree with rows of tables the bundle does not track here.
create or replace function bundle._check_root(bundle_name text, root text) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp set jit = off as $$
declare
    missing text;
begin
    select e.name into missing from bundle.object o cross join bundle._entries(o.data) e
    where o.bundle = bundle_name and o.id = root
      and e.name not in (select n.relation_name from bundle._tracked_names(bundle_name) n)
    order by 1 limit 1;
    if found then
        raise exception 'bundle "%" has rows of table %, which it does not track in this database', bundle_name, missing
            using errcode = '55000',
            hint = format('Create the table if need be and track it: select bundle.track(%L, %L), then try again.',
                          bundle_name, missing);
    end if;
end
$$;

-- Walking a tree received from elsewhere, node by node, beside the tree checked out here.
-- A node's place says where it hangs: '' a root; a tracked table's node its relation's oid and
-- ':'; a fan node or bucket that and its path ('16384:3f', '16384:3f2a'); null a blob, or a node
-- of a table not tracked here.  The node the checked-out tree has at the same place is in the
-- store with everything below it, and so is every child listed on the same line of both: of
-- the 65,536 children of the 256 fan nodes a pull of 1,000 scattered rows receives, only the
-- lines that differ (about 1,000) need a look in the store.
-- The node the bundle's checked-out tree has at a place (no row: none, or no place).  A set of
-- rows with a FROM clause, so that the planner inlines it: a call per child of a clone's buckets
-- cost 15 us as a function.
create or replace function bundle._node_at(bundle_name text, place text) returns table (id text)
language sql stable rows 1 as $$
    select c.tree from bundle.bundle b join bundle.commit c on c.bundle = b.name and c.id = b.checked_out
    where place = '' and b.name = bundle_name
    union all
    select h.id from bundle.head_node h
    where h.bundle = bundle_name and h.relation = nullif(split_part(place, ':', 1), '')::oid::regclass
      and h.path = split_part(place, ':', 2)
$$;

-- A node received that does not fit its place is refused: otherwise a sender could hang one
-- node at many places and make the walk below them as long as it likes.  (Stable, not
-- immutable, so that the planner never calls it ahead of time.)
create or replace function bundle._misplaced(kind text, place text, line text) returns text
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
begin
    raise exception 'a % node received does not fit its place % in the tree: it has the line "%"',
        kind, coalesce(place, '(unknown)'), left(line, 140)
        using errcode = 'XX001', hint = 'The sender''s tree is malformed (or was altered); nothing below it is kept.';
end
$$;

-- The given nodes (ids at places) other than those the checked-out tree has at their places,
-- and what lies below those held only as pending nodes, down to what the store may hold, each
-- with its place and whether it is pending: the walk bundle._lacking and bundle._promote share.
-- Probes are by key ("limit 1", scalar subqueries): within one long transaction (an import) the
-- store has no statistics, and a join hashing all of it on each call would be quadratic.  With
-- enable_seqscan off the probes stay on the indexes: bundle.pending is small during a clone (its
-- ~260 fan nodes), and the planner then scanned it whole for each of the 65,000 buckets below
-- them (17 µs each instead of 1).
create or replace function bundle._pending_walk(bundle_name text, ids text[], places text[])
returns table (id text, place text, pending boolean)
language sql stable set search_path = pg_catalog, pg_temp set jit = off set work_mem = '256MB' set enable_seqscan = off as $$
    -- The walk goes down through pending roots and fan nodes, each once per place ("union": a
    -- node whose place is unknown once however often it is listed; bundle._new_children bounds
    -- the rest).  The blobs below pending buckets (a clone has a million) are listed after it,
    -- without being walked or looked for among the pending nodes.
    with recursive walk(id, place) as (
        select i.id, i.place from unnest(ids, places) i(id, place)
        where i.place is null or i.id is distinct from (select n.id from bundle._node_at(bundle_name, i.place) n)
        union
        select c.id, c.place from walk w
        cross join lateral (select p.kind, p.data from bundle.pending p
                            where p.bundle = bundle_name and p.id = w.id and p.kind <> 'bucket' limit 1) p
        cross join lateral bundle._new_children(bundle_name, p.kind, p.data, w.place) c
    ), found as (
        select w.id, w.place, p.kind, p.data from walk w
        left join lateral (select p.kind, p.data from bundle.pending p where p.bundle = bundle_name and p.id = w.id
                           limit 1) p on true
    ), below as (
        select f.id, f.place, f.kind is not null as pending from found f
        union all
        select c.id, c.place, false from found f
        cross join lateral bundle._new_children(bundle_name, f.kind, f.data, f.place) c
        where f.kind = 'bucket'
    )
    -- In the order of ids, so that the caller's probes walk the store's index in order: twice as
    -- fast as at random.
    select * from below order by id
$$;

-- Of the given nodes, those the bundle lacks, and the children of those held only as pending
-- nodes that it lacks in turn (what a pull that broke off still has to ask for), with their places.
create or replace function bundle._lacking(bundle_name text, ids text[], places text[]) returns table (id text, place text)
language sql stable set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
    select w.id, w.place from bundle._pending_walk(bundle_name, ids, places) w
    where not w.pending and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = w.id) is null
$$;

-- bundle._keep where no object's place is known.
create or replace function bundle._keep(bundle_name text, ids text[], datas bytea[]) returns setof text
language sql set search_path = pg_catalog, pg_temp set jit = off as $$
    select k.id from bundle._keep(bundle_name, ids, datas, array_fill(null::text, array[cardinality(ids)])) k
$$;

-- Move the pending nodes below the given roots to bundle.object, once nothing below them is missing
-- (the walk of bundle._pending_walk).  A node the store holds is not walked again, so a node that a malformed tree lists
-- at two places of one table is refused here: a bucket kept at one place would otherwise stand
-- unchecked at the other.  (No two nodes of one table are alike: their lines start with their
-- places.  Two tracked tables with the same rows do share theirs, at the same paths.)
create or replace function bundle._promote(bundle_name text, roots text[]) returns void
language plpgsql set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
declare
    moving text[];
    missing text;
    twice text[];  -- [node, one place, another]
begin
    -- Garbage collection skips a bundle whose row is locked, so nothing checked here is
    -- collected before this transaction ends.
    perform from bundle.bundle b where b.name = bundle_name for key share;
    with walk as materialized (
        select * from bundle._pending_walk(bundle_name, roots, array(select '' from unnest(roots)))
    ), placed_twice as (
        select w.id, min(w.place) as one, max(w.place) as other from walk w
        where w.place is not null group by w.id having count(distinct split_part(w.place, ':', 2)) > 1 limit 1
    )
    select (select array_agg(w.id) from walk w where w.pending),
           (select min(w.id) from walk w
            where not w.pending
              and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = w.id) is null),
           (select array[t.id, t.one, t.other] from placed_twice t)
        into moving, missing, twice;
    if twice is not null then
        raise exception 'bundle "%": the tree received has node % at two places, % and %', bundle_name, twice[1],
                        twice[2], twice[3]
            using errcode = 'XX001', hint = 'The sender''s tree is malformed (or was altered); nothing below it is kept.';
    end if;
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

-- The children of a tree node at a place that are not on the same line of the node the
-- checked-out tree has there, with their places.  Where the place is known, each such line
-- must fit it: a root hangs at '', a fan node at a table's place or one two-hex-digit step below,
-- naming its children by two hex digits; a bucket four digits down, its key hashes starting so.
-- A bucket/2 names no children: its rows are in it, each on a line that must fit its place too
-- (bundle._bucket_misfit).  A root's child hangs at its table's place: the tracked table's oid, or none ('' before the
-- ':') where the bundle tracks no such table that this transaction can see.  A clone is such a
-- case: the caller's transaction tracks the tables (bundle._adopt) while executors keep what
-- arrives in their own; with its places unknown, every bucket would wait among the pending nodes
-- for bundle._promote to walk and check at the end (9 s for a million rows).  A place's table only
-- finds the node checked out there, and a bundle has none of a table it does not track.
-- The lines (after the first) of a node received at a place that are not on the same line of the
-- node the checked-out tree has there, with their numbers: what bundle._new_children looks at,
-- and the rows bundle._new_rows counts.
create or replace function bundle._unlike_lines(bundle_name text, data bytea, place text)
returns table (line text, n bigint)
language sql stable rows 100 as $$
    select z.line, z.n
    from unnest(bundle._lines(data),
                bundle._lines((select o.data from bundle.object o where o.bundle = bundle_name
                               and o.id = (select n.id from bundle._node_at(bundle_name, place) n))))
         with ordinality z(line, old, n)
    where z.n > 1 and z.line <> '' and z.line is distinct from z.old
$$;

create or replace function bundle._new_children(bundle_name text, kind text, data bytea, place text)
returns table (id text, place text)
language sql stable rows 100 as $$
    select case when place is null
                  or z.n = 1 or coalesce(z.line, '') = ''  -- (filtered out below, whatever the plan's order)
                  or case kind when 'root' then place = ''
                               when 'fan' then place <> '' and length(split_part(place, ':', 2)) < 4
                                               and left(z.line, -65) ~ '^[0-9a-f]{2}$'
                               else length(split_part(place, ':', 2)) = 4
                                    and left(z.line, 4) = split_part(place, ':', 2) end
                then right(z.line, 64)
                else bundle._misplaced(kind, place, z.line) end,
           case when kind = 'root' then coalesce((select k.relation::oid::text from bundle.tracked k
                                                  join pg_class c on c.oid = k.relation
                                                  join pg_namespace s on s.oid = c.relnamespace
                                                  where k.bundle = bundle_name
                                                    and format('%s.%s', s.nspname, c.relname) = left(z.line, -65)),
                                                 '') || ':'
                when kind = 'fan' then place || left(z.line, -65) end
    from bundle._unlike_lines(bundle_name, data, place) z
    where substr(data, 1, 18) <> convert_to('aquapeer-bucket/2' || E'\n', 'UTF8')
    union all
    -- a bucket/2: every line checked at once (in C), and none returned
    select null, null
    from (select case when place is not null and length(split_part(place, ':', 2)) <> 4
                      then '(a bucket that does not hang four hex digits down)'
                      else bundle._bucket_misfit(data, split_part(place, ':', 2)) end as line) m
    where substr(data, 1, 18) = convert_to('aquapeer-bucket/2' || E'\n', 'UTF8')
      and m.line is not null and bundle._misplaced(kind, place, m.line) is null
$$;

-- Keep objects received for a bundle, each checked against its id: blobs in bundle.object,
-- tree nodes in bundle.pending until bundle._promote.  places gives each object's place (null
-- where unknown).  Returns what the bundle still lacks below the nodes, with places (what to ask
-- for next).
--
-- A bucket received at a known place (its lines checked against it) all of whose blobs are in
-- the store or among the objects received joins the store at once: nothing below it is missing.
-- A clone receives its buckets with their blobs, so it leaves no buckets pending for
-- bundle._promote to walk and check blob by blob (9 s of a clone of a million rows); a bucket's
-- blobs received with it are not looked for in the store.  Other buckets wait among the pending
-- nodes (an import's, whose places the walk finds), and what they lack is returned with the
-- lacking children of roots and fan nodes.
--
-- Each statement inserts in id order.  Two requests of a pull are kept side by side, and their
-- answers share blobs: a clone of a bundle with history gets the old and the new bucket at a
-- place, which name the same unchanged rows.  Two transactions inserting the same keys in
-- different orders each wait for the other's uncommitted row (a deadlock, which failed the pull);
-- in one order, one only waits for the other.
--
-- A store emptied and vacuumed (a bundle dropped, then autovacuum or VACUUM) has relpages = 0
-- and reltuples = 0, and the planner takes it for empty.  A plan made then, and kept by a
-- long-lived session (an executor, a pooled connection), read bundle.object whole for each
-- object or bucket it then kept: a clone of a million rows into a store emptied after an
-- earlier clone took over 10 minutes instead of 32 s, and an import probed the store with a
-- sequential scan per document.  This function, bundle._lacking, bundle._promote and
-- bundle.import only look objects up by key, so they run with enable_seqscan off and never scan.
create or replace function bundle._keep(bundle_name text, ids text[], datas bytea[], places text[])
returns table (id text, place text)
language plpgsql set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
#variable_conflict use_column
declare
    bad record;
    child_ids text[];
    child_places text[];
    blob_ids text[];
begin
    select i.id, encode(sha256(i.data), 'hex') as actual into bad
    from unnest(ids, datas) i(id, data) where i.id is distinct from encode(sha256(i.data), 'hex') limit 1;
    if found then
        raise exception 'object % does not match its content (it hashes to %)', bad.id, bad.actual
            using errcode = 'XX001', hint = 'The sender altered or damaged it; nothing of it was kept.';
    end if;
    -- Locked as a foreign key would: the bundle stays until this transaction ends, and retention
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
    -- The blobs first, so that the buckets received with them find them in the store below.
    insert into bundle.object select bundle_name, i.id, 'blob', i.data from unnest(ids, datas) i(id, data)
    where bundle._kind(i.data) = 'blob' order by i.id on conflict do nothing;
    with received as materialized (
        -- Each bucket with the blobs it names that the store lacks, of those on lines the bucket
        -- checked out at its place lacks (every lookup linear in what was received: a bucket's
        -- own probes, no join between the buckets and the blobs).  A blob received with it is in
        -- the store now: a hashed look at the blobs received says so without a probe of the
        -- store (a clone's request of 500 buckets and 7,500 blobs: 32 ms instead of 45).  Only
        -- blobs: a tree node received is not in the store yet.
        select r.id, r.kind, r.data, r.place,
               case when r.kind = 'bucket' then array(
                   select c.id from bundle._new_children(bundle_name, 'bucket', r.data, r.place) c
                   where c.id not in (select u.id from unnest(ids, datas) u(id, data)
                                      where bundle._kind(u.data) = 'blob')
                     and (select o.id from bundle.object o where o.bundle = bundle_name and o.id = c.id) is null)
               end as lacking
        from (select i.id, bundle._kind(i.data) as kind, i.data, i.place
              from unnest(ids, datas, places) i(id, data, place)) r
        where r.kind <> 'blob'
    ), complete as (
        insert into bundle.object select bundle_name, r.id, r.kind, r.data from received r
        where r.kind = 'bucket' and r.place is not null and cardinality(r.lacking) = 0
        order by r.id on conflict do nothing
    ), nodes as (
        insert into bundle.pending select bundle_name, r.id, r.kind, r.data from received r
        where r.kind <> 'bucket' or r.place is null or cardinality(r.lacking) > 0
        order by r.id on conflict do nothing
    )
    select coalesce(array_agg(c.id), '{}'), coalesce(array_agg(c.place), '{}'),
           array(select distinct u.id from received r cross join lateral unnest(r.lacking) u(id))
        into child_ids, child_places, blob_ids
    from received r cross join lateral bundle._new_children(bundle_name, r.kind, r.data, r.place) c
    where r.kind in ('root', 'fan');
    return query
        select l.id, l.place from bundle._lacking(bundle_name, child_ids, child_places) l
        union all
        select u.id, null from unnest(blob_ids) u(id);
end
$$;

-- How many rows the given buckets received (kept already) bring that the tree checked out here
-- lacks at their places: the lines of each bucket/2 unlike the checked-out bucket's line at the
-- same position (a row added shifts the lines below it, which then count too).  What a pull's
-- progress counts as rows.
create or replace function bundle._new_rows(bundle_name text, ids text[], places text[]) returns bigint
language sql stable set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
    select count(*) from unnest(ids, places) r(id, place)
    cross join lateral (select coalesce((select o.data from bundle.object o where o.bundle = bundle_name and o.id = r.id),
                                        (select p.data from bundle.pending p where p.bundle = bundle_name and p.id = r.id))
                               as data) d
    cross join lateral bundle._unlike_lines(bundle_name, d.data, r.place) z
    where substr(d.data, 1, 18) = convert_to('aquapeer-bucket/2' || E'\n', 'UTF8')
$$;

-- Documents of an export in order, as bundle.import one at a time would take them, with each run
-- of objects kept in one step: bundle.import's work per call (its checks, the lock and the probes
-- of bundle._keep) came to 3 ms a document, an hour for a bundle of a million rows.  Each
-- document's type and outcome ('new' or 'known'), in order; an object that comes twice in a run
-- is 'known' the second time, as one at a time.
create or replace function bundle.import_batch(documents jsonb[])
returns table (type text, outcome text)
language plpgsql security definer set search_path = pg_catalog, pg_temp set jit = off set enable_seqscan = off as $$
declare
    first integer := 1;
    last integer;
    total integer := coalesce(cardinality(documents), 0);
    target text;
begin
    while first <= total loop
        last := first;
        target := nullif(current_setting('bundle.importing', true), '')::jsonb->>'bundle';
        if documents[first]->>'type' = 'object' and target is not null then
            while last < total and documents[last + 1]->>'type' = 'object' loop
                last := last + 1;
            end loop;
            return query
                select 'object', case when row_number() over (partition by d->>'id' order by n) > 1
                                        or exists (select from bundle.object o where o.bundle = target and o.id = d->>'id')
                                        or exists (select from bundle.pending p where p.bundle = target and p.id = d->>'id')
                                      then 'known' else 'new' end
                from unnest(documents[first:last]) with ordinality u(d, n) order by n;
            perform bundle._keep(target, array(select d->>'id' from unnest(documents[first:last]) d),
                                 array(select decode(d->>'data', 'base64') from unnest(documents[first:last]) d));
        else
            return query select documents[first]->>'type', bundle.import(documents[first]);
        end if;
        first := last + 1;
    end loop;
end
$$;
comment on function bundle.import_batch(jsonb[]) is
    'load documents of a bundle export in order, as bundle.import each; returns each one''s type and outcome';
