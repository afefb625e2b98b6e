-- Bundles, version-controlled sets of rows (schema bundle; docs/bundles.md),
-- and their sharing and transfers between friends, as of 0.11.0.

create schema bundle;

-- head: the newest commit of the bundle's branch; checked_out: the commit its tables were last
-- made equal to (bundle.head_row holds its rows).  They differ after a friend pushed, until
-- bundle.checkout.
create table bundle.bundle (
    name text primary key check (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    head text,
    checked_out text,
    created_at timestamptz not null default now(),
    -- When objects were last received (to within an hour) that no commit may ever reference (a
    -- pull that broke off); retention looks for unreferenced objects once this is older than
    -- object_retention.
    loose_since timestamptz
);

create table bundle.tracked (
    bundle text not null references bundle.bundle on delete cascade,
    relation regclass not null,
    filter text,
    key_columns name[] not null,
    primary key (bundle, relation)
);

-- No foreign keys to bundle.bundle on the tables that take a row per object, per tracked row or
-- per changed key (head_row, changed_key, object, pending, head_node): checking one per row
-- inserted took 3 s of a 1,000,000-row commit for bundle.object and as much for bundle.head_row,
-- and as long again in a clone.  What writes to them locks the bundle's row instead (for key
-- share, as the checks did; bundle.commit, bundle.checkout and bundle._integrate lock it for
-- update), and a trigger (bundle._forget) deletes a bundle's rows with it.

-- The rows of each bundle's head commit: what status compares with and what
-- a commit changes (one row per tracked row, whatever the number of commits).
create table bundle.head_row (
    bundle text not null,
    relation regclass not null,
    -- "C": hex digits sort the same in every collation, and comparing bytes is cheaper.
    key_hash text collate "C" not null,
    key jsonb not null,
    blob text not null,
    primary key (bundle, relation, key_hash)
);

-- Keys written since each bundle's head, recorded by the capture triggers of tracked tables.
-- The JSON null key stands for every key of the table (bundle._whole).
create table bundle.changed_key (
    bundle text not null,
    relation regclass not null,
    key jsonb not null,
    primary key (bundle, relation, key)
);

-- Immutable, content-addressed objects (docs/bundles.md): blobs, buckets, fan nodes, roots, commits.
-- (The id checks avoid a {64} repetition: PostgreSQL's regex engine matches it slowly.)
-- Each bundle has its own store, so a friend a bundle is shared with can ask for objects of that
-- bundle only.  An object is here only with everything below it: a tree node's children, a commit's
-- tree and parents.
create table bundle.object (
    bundle text not null,
    id text not null check (id ~ '^[0-9a-f]+$' and length(id) = 64),
    kind text not null check (kind in ('blob', 'bucket', 'fan', 'root', 'commit')),
    data bytea not null,
    primary key (bundle, id)
);

-- Tree nodes received (from a friend or bundle.import) whose subtrees may be incomplete: checked
-- against their ids and kept, so a pull that broke off resumes without fetching them again.
-- bundle._promote moves them to bundle.object once everything below them is there.  (Blobs, which
-- have nothing below them, go to bundle.object at once.)
create table bundle.pending (
    bundle text not null,
    id text not null check (id ~ '^[0-9a-f]+$' and length(id) = 64),
    kind text not null check (kind in ('bucket', 'fan', 'root')),
    data bytea not null,
    primary key (bundle, id)
);

-- Tree nodes are kilobytes of hex ids (a fan node of a large table 17 kB): pglz took 70 ms to
-- compress the 256 fan nodes an incremental pull of 1,000 rows receives.  lz4 (PostgreSQL
-- built with it, as Debian's is) compresses them ten times faster.
do $$
begin
    if exists (select from pg_settings where name = 'default_toast_compression' and 'lz4' = any (enumvals)) then
        alter table bundle.object alter column data set compression lz4;
        alter table bundle.pending alter column data set compression lz4;
    end if;
end
$$;

-- Commits, as bundle.log shows them; the signed document is kept with them.
create table bundle.commit (
    bundle text not null,
    id text not null,
    parents text[] not null,
    tree text not null,
    author text not null,
    message text not null,
    committed_at timestamptz not null,
    rows_changed bigint not null,
    document jsonb not null,
    primary key (bundle, id),
    foreign key (bundle, id) references bundle.object on delete cascade,
    foreign key (bundle, tree) references bundle.object on delete cascade
);

-- The nodes of each bundle's head tree by path: '' a table's node, two hex digits a
-- fan node, four a bucket; so a commit rewrites only the paths its rows hang on.
create table bundle.head_node (
    bundle text not null,
    relation regclass not null,
    path text not null,
    id text not null,
    primary key (bundle, relation, path)
);

select pg_catalog.pg_extension_config_dump('bundle.bundle', '');
select pg_catalog.pg_extension_config_dump('bundle.tracked', '');
select pg_catalog.pg_extension_config_dump('bundle.head_row', '');
select pg_catalog.pg_extension_config_dump('bundle.changed_key', '');
select pg_catalog.pg_extension_config_dump('bundle.object', '');
select pg_catalog.pg_extension_config_dump('bundle.commit', '');
select pg_catalog.pg_extension_config_dump('bundle.pending', '');
select pg_catalog.pg_extension_config_dump('bundle.head_node', '');

-- Which friend may pull (and push to) which bundle; nothing is shared by default.
create table peer.bundle_share (
    bundle text not null references bundle.bundle on delete cascade on update cascade,
    friend text not null references peer.friend on delete cascade on update cascade,
    can_push boolean not null default false,
    shared_at timestamptz not null default now(),
    primary key (bundle, friend)
);
select pg_catalog.pg_extension_config_dump('peer.bundle_share', '');

-- Transfers, written by executors in their own transactions as they go, so every session sees
-- their progress while they run (never in the puller's transaction).
create table peer.transfer (
    id uuid primary key,
    friend text not null,
    bundle text not null,
    direction text not null check (direction in ('pull', 'push', 'pushed to us')),
    state text not null default 'running' check (state in ('running', 'done', 'failed', 'cancelled')),
    bytes_done bigint not null default 0,
    rows_done bigint not null default 0,
    rows_total bigint,
    objects_done bigint not null default 0,
    commits bigint not null default 0,
    started_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    finished_at timestamptz,
    error text
);

-- A merge in progress (bundle.commit then makes a commit with the parents ours and theirs)
-- and its conflicts, which keep our value in the table until bundle.resolve.
create table bundle.merge (
    bundle text primary key references bundle.bundle on delete cascade,
    theirs text not null,
    ours text not null,
    base text,
    started_at timestamptz not null default now()
);
-- column_name null: the whole row (deleted on one side, changed on the other); base, ours and
-- theirs are then the rows as JSON, null where there is none.
create table bundle.conflicts (
    bundle text not null references bundle.merge on delete cascade,
    relation regclass not null,
    key jsonb not null,
    column_name text,
    base text,
    ours text,
    theirs text
);
create unique index on bundle.conflicts (bundle, relation, key, coalesce(column_name, ''));
select pg_catalog.pg_extension_config_dump('bundle.merge', '');
select pg_catalog.pg_extension_config_dump('bundle.conflicts', '');
