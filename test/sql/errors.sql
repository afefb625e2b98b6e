-- The SQL API's errors for bad input.  Run by `make installcheck` in a
-- database whose worker is not running (pg_regress creates it; only
-- aquapeer.database gets a worker at server start).
-- Each error with its DETAIL and HINT; CONTEXT (the PL/pgSQL line, the
-- Python traceback) is left out, as it changes with every edit.
\set SHOW_CONTEXT never

-- Friends
select peer.add_friend('sally', 'not an invite');
select peer.add_friend('sally', 'aquapeer-invite:1:not*base64');
select peer.add_friend('sally', 'aquapeer-invite:2:AAAA');
select peer.add_friend('me', peer.invite());
select peer.block('nobody');
select peer.remove_friend('nobody', 'gone');
select peer.set_friend_role('nobody', 'aquapeer_friend');
select peer.set_friend_role('nobody', 'postgres');
select peer.accept_friend('not-a-peer-id', 'sally');

-- Messages and calls
select peer.send('nobody', 'chat', '{"text": "hi"}');
select peer.allow_topic('', 'nobody');
select peer.on_message('chat', 'pg_catalog.now()'::regprocedure);
select peer.expose('pg_catalog.now()'::regprocedure, 'nobody');

-- The worker, which does not run for this database.  Terse: the DETAIL
-- names the socket's path, which differs from one cluster to the next.
\set VERBOSITY terse
select peer.ping_worker();
select peer.retry_message('00000000-0000-0000-0000-000000000000');
select peer.connect('nobody');
select peer.call('nobody', 'app.price_of', '{}');
select peer.pull_bundle('nobody', 'widget');
select peer.nudge_worker();
\set VERBOSITY default

-- Bundles
select bundle.create('Bad Name');
select bundle.create('');
select bundle.create('widget');
select bundle.create('widget');
select bundle.track('nope', 'pg_catalog.pg_class');
create table keyless (x integer);
select bundle.track('widget', 'keyless');
select bundle.commit('nope', 'nothing');
select * from bundle.log('nope');
select * from bundle.status('nope');
select bundle.checkout('widget', 'not-a-commit');
select peer.share_bundle('widget', 'nobody');
select bundle.import('{"type": "nonsense"}');
update bundle.bundle set name = 'gadget' where name = 'widget';
select bundle.drop('widget');
select bundle.drop('widget');
drop table keyless;
