-- CREATE EXTENSION and ALTER EXTENSION UPDATE fail here, clearly, when this
-- version's payload is missing or of another version.
select peer._bootstrap();

-- A new database gets its identity; an upgraded one keeps its own.
select peer._new_identity() where not exists (select from peer.identity);
