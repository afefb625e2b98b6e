-- What every step below may need: the record of run-once steps, and the roles.

-- Each run-once step (sql/incremental) is recorded here when it has run.
create table if not exists peer.migration (
    name text primary key,
    body_sha256 text not null,
    applied_in text not null,
    applied_at timestamptz not null default now()
);
comment on table peer.migration is 'the run-once steps of aquapeer''s schema that have run here, and in which version';

-- Roles are cluster-wide and outlive DROP EXTENSION: create them only once.
do $$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'aquapeer_admin') then
        create role aquapeer_admin nologin;
    end if;
    if not exists (select from pg_catalog.pg_roles where rolname = 'aquapeer_friend') then
        create role aquapeer_friend nologin;
    end if;
end
$$;
-- Executors connect as the role a friend acts as, and PostgreSQL 15 lets a
-- background worker connect only as a role that can log in.  The role has
-- no password and no privileges of its own.
alter role aquapeer_friend login;
comment on role aquapeer_friend is 'default role friends act as; no privileges of its own';
