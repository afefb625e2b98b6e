#!/bin/sh
# Sets up aquapeer in a new cluster: the Dockerfile puts it in /docker-entrypoint-initdb.d,
# which the postgres image runs once, on an empty data directory, against a server
# that listens on its Unix socket only (docs/docker.md).  psql's connection comes from
# the environment (PGHOST, PGPORT; the user is POSTGRES_USER, default postgres).
#
#   AQUAPEER_DATABASE         the database to create the extension in (made if missing), and
#                             aquapeer.database from the next server start; unset: only the
#                             library is preloaded, and CREATE EXTENSION is left to you
#   AQUAPEER_SIGNAL_URL       signaling server, ws://host:port or wss://host:port (optional)
#   AQUAPEER_STUN_URL         STUN server, stun:host:port (optional)
#   AQUAPEER_TURN_URL         TURN server, turn:host:port or turns:host:port (optional),
#   AQUAPEER_TURN_USERNAME    with its username and credential (both or neither)
#   AQUAPEER_TURN_CREDENTIAL
#   AQUAPEER_DISPLAY_NAME     the name this database gives itself to others (optional)
set -eu

fail() {
    echo "aquapeer init: $*" >&2
    exit 1
}

database=${AQUAPEER_DATABASE-}
if [ -z "$database" ]; then
    echo "aquapeer init: AQUAPEER_DATABASE is not set: the library is preloaded, CREATE EXTENSION is left to you"
    exit 0
fi
signal_url=${AQUAPEER_SIGNAL_URL-}
stun_url=${AQUAPEER_STUN_URL-}
turn_url=${AQUAPEER_TURN_URL-}
turn_username=${AQUAPEER_TURN_USERNAME-}
turn_credential=${AQUAPEER_TURN_CREDENTIAL-}
display_name=${AQUAPEER_DISPLAY_NAME-}

# The tables refuse these too, but only this names the variable to fix.
case "$signal_url" in
    "" | ws://?* | wss://?*) ;;
    *) fail "AQUAPEER_SIGNAL_URL must be ws://host:port or wss://host:port, not '$signal_url'" ;;
esac
case "$stun_url" in
    "" | stun:?* | stuns:?*) ;;
    *) fail "AQUAPEER_STUN_URL must be stun:host:port or stuns:host:port, not '$stun_url'" ;;
esac
case "$turn_url" in
    "" | turn:?* | turns:?*) ;;
    *) fail "AQUAPEER_TURN_URL must be turn:host:port or turns:host:port, not '$turn_url'" ;;
esac
if { [ -n "$turn_username" ] && [ -z "$turn_credential" ]; } || { [ -z "$turn_username" ] && [ -n "$turn_credential" ]; }; then
    fail "set both AQUAPEER_TURN_USERNAME and AQUAPEER_TURN_CREDENTIAL, or neither"
fi
if [ -z "$turn_url" ] && [ -n "$turn_username" ]; then
    fail "AQUAPEER_TURN_USERNAME is set but AQUAPEER_TURN_URL is not: set the TURN server's URL too"
fi

psql_as_owner() {
    psql -X -q -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" "$@"
}

psql_as_owner --dbname postgres -v database="$database" <<'SQL'
select format('create database %I', :'database')
where not exists (select from pg_catalog.pg_database where datname = :'database') \gexec
-- The launcher runs the worker of this database from the next server start on.
alter system set aquapeer.database = :'database';
SQL

psql_as_owner --dbname "$database" -v signal_url="$signal_url" -v stun_url="$stun_url" \
    -v turn_url="$turn_url" -v turn_username="$turn_username" -v turn_credential="$turn_credential" \
    -v display_name="$display_name" <<'SQL'
create extension if not exists aquapeer cascade;
insert into peer.signal_server (url) select :'signal_url' where :'signal_url' <> ''
on conflict (url) do nothing;
insert into peer.stun_server (url) select :'stun_url' where :'stun_url' <> ''
on conflict (url) do nothing;
insert into peer.turn_server (url, username, credential)
select :'turn_url', nullif(:'turn_username', ''), nullif(:'turn_credential', '') where :'turn_url' <> ''
on conflict (url) do update set username = excluded.username, credential = excluded.credential;
update peer.config set display_name = :'display_name' where :'display_name' <> '';
SQL
echo "aquapeer init: extension aquapeer created in database $database, peer $(psql_as_owner --dbname "$database" -Atc 'select peer.whoami()')"
