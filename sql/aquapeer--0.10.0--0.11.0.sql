-- aquapeer 0.10.0 -> 0.11.0: keeping, promoting and importing objects probe the store by key, whatever the planner believes of its size; bundle.import_batch imports many documents in one call.
\echo Use "ALTER EXTENSION aquapeer UPDATE" to load this file. \quit

-- A store emptied and vacuumed (a bundle dropped, then autovacuum or VACUUM) has relpages = 0
-- and reltuples = 0, and the planner takes it for empty.  A plan made then, and kept by a
-- long-lived session (an executor, a pooled connection), read bundle.object whole for each
-- object or bucket it then kept: a clone of a million rows into a store emptied after an
-- earlier clone took over 10 minutes instead of 32 s, and an import probed the store with a
-- sequential scan per document.  These functions only look objects up by key (as
-- bundle._pending_walk, 0.9.0), so they never scan.
alter function bundle._keep(text, text[], bytea[], text[]) set enable_seqscan = off;
alter function bundle._lacking(text, text[], text[]) set enable_seqscan = off;
alter function bundle._promote(text, text[]) set enable_seqscan = off;
alter function bundle.import(jsonb) set enable_seqscan = off;

-- Documents of an export in order, as bundle.import one at a time would take them, with each run
-- of objects kept in one step: bundle.import's work per call (its checks, the lock and the probes
-- of bundle._keep) came to 3 ms a document, an hour for a bundle of a million rows.  Each
-- document's type and outcome ('new' or 'known'), in order; an object that comes twice in a run
-- is 'known' the second time, as one at a time.
create function bundle.import_batch(documents jsonb[])
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
revoke all on function bundle.import_batch(jsonb[]) from public;
grant execute on function bundle.import_batch(jsonb[]) to aquapeer_admin;
