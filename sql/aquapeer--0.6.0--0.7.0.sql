-- aquapeer 0.6.0 -> 0.7.0: a friend's commits served from given starting points, newest first, so that a pull takes a long history in pages.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- The signed commits of a bundle that a friend lacks: those reachable from starts (by default
-- the head) without passing through one of those it has, newest first.  From protocol 4 an
-- answer holds as many as fit in one message, and the friend asks again from the parents it
-- still lacks.  (The commits it has are looked up by hashing: a pull far behind a long history
-- walks tens of thousands of commits against thousands it has.)
drop function peer._serve_bundle_commits(text, text, boolean, text[]);
create function peer._serve_bundle_commits(bundle_name text, friend text, granted boolean, have text[],
                                           starts text[] default null)
returns setof jsonb
language plpgsql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
begin
    perform peer._check_bundle_served(bundle_name, friend, granted);
    return query
        with recursive history(id) as (
            select s from unnest(coalesce(starts, array[(select b.head from bundle.bundle b where b.name = bundle_name)])) s
            where s not in (select unnest(have))
            union
            select p from history h join bundle.commit c on c.bundle = bundle_name and c.id = h.id
            cross join unnest(c.parents) p where p not in (select unnest(have))
        )
        select c.document from history h join bundle.commit c on c.bundle = bundle_name and c.id = h.id
        order by c.committed_at desc, c.id;
end
$$;
revoke all on function peer._serve_bundle_commits(text, text, boolean, text[], text[]) from public;
-- Serving runs in executors connected as the friend's role; _executor_nonce refuses anybody else.
grant execute on function peer._serve_bundle_commits(text, text, boolean, text[], text[]) to public;
