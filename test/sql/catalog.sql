-- The extension's catalog as far as security goes: its functions and
-- procedures with their language, whether each runs as its owner, whether it
-- pins search_path and who besides the owner may execute it; then its tables,
-- views and sequences with the privileges others hold on them.  Internal
-- helpers (a leading underscore, run as the caller, search_path pinned, for
-- the owner only) are left out: refactoring adds and removes them.  A change
-- here changes the SQL API or its privileges: review it as one, then accept
-- it with cp results/catalog.out test/expected/.
create temporary view member as
    select d.classid, d.objid from pg_depend d
    join pg_extension e on e.oid = d.refobjid
    where d.refclassid = 'pg_extension'::regclass and d.deptype = 'e' and e.extname = 'aquapeer';

-- Roles other than the owner holding a privilege in an ACL.
create function pg_temp.others(acl aclitem[], owner oid, privilege text) returns text
language sql as $$
    select coalesce(string_agg(g, ', ' order by g collate "C"), '')
    from (select case when a.grantee = 0 then 'PUBLIC' else a.grantee::regrole::text end as g
          from aclexplode(acl) a
          where a.grantee <> owner and a.privilege_type = privilege) grants
$$;

select p.oid::regprocedure as function, l.lanname as language, p.prosecdef as definer,
       coalesce(p.proconfig @> '{"search_path=pg_catalog, pg_temp"}', false) as pinned,
       pg_temp.others(coalesce(p.proacl, acldefault('f', p.proowner)), p.proowner, 'EXECUTE')
           as executable_by
from pg_proc p
join member m on m.classid = 'pg_proc'::regclass and m.objid = p.oid
join pg_language l on l.oid = p.prolang
where p.proname !~ '^_' or p.prosecdef
   or not coalesce(p.proconfig @> '{"search_path=pg_catalog, pg_temp"}', false)
   or pg_temp.others(coalesce(p.proacl, acldefault('f', p.proowner)), p.proowner, 'EXECUTE') <> ''
order by p.oid::regprocedure::text collate "C";

select c.oid::regclass as relation, c.relkind as kind,
       pg_temp.others(c.relacl, c.relowner, 'SELECT') as select_by,
       pg_temp.others(c.relacl, c.relowner, 'INSERT') as insert_by,
       pg_temp.others(c.relacl, c.relowner, 'UPDATE') as update_by,
       pg_temp.others(c.relacl, c.relowner, 'DELETE') as delete_by,
       pg_temp.others(c.relacl, c.relowner, 'USAGE') as usage_by
from pg_class c
join member m on m.classid = 'pg_class'::regclass and m.objid = c.oid
where c.relkind in ('r', 'p', 'v', 'm', 'S')
order by c.oid::regclass::text collate "C";

-- Privileges on single columns.
select a.attrelid::regclass as relation, a.attname as column_name, x.privilege_type as privilege,
       x.grantee::regrole as grantee
from pg_attribute a
join member m on m.classid = 'pg_class'::regclass and m.objid = a.attrelid
cross join aclexplode(a.attacl) x
order by a.attrelid::regclass::text collate "C", a.attname collate "C", x.privilege_type,
         x.grantee::regrole::text collate "C";

-- The schemas and who may use them.
select n.nspname as schema, pg_temp.others(n.nspacl, n.nspowner, 'USAGE') as usage_by
from pg_namespace n
where n.oid in (select m.objid from member m where m.classid = 'pg_namespace'::regclass)
   or n.oid = (select e.extnamespace from pg_extension e where e.extname = 'aquapeer')
order by n.nspname collate "C";
