-- Object format aquapeer-bundle/2 (0.17.0): buckets hold their rows, so the head's rows are read
-- from the head's buckets (bundle.head_node) and bundle.head_row goes.  Commits of
-- aquapeer-bundle/1 keep their trees and blobs.
-- Out of the extension first: that also takes it off the tables pg_dump dumps (extconfig), where
-- a dropped table would stay behind as a bare oid.
alter extension aquapeer drop table bundle.head_row;
drop table bundle.head_row;

-- Functions gone, or whose arguments or results changed (CREATE OR REPLACE cannot change those).
drop function if exists bundle._rebuild(text, regclass, text[]);
drop function if exists bundle._move_head_rows(text);
drop function if exists bundle._changes_query(text, bundle.tracked);
drop function if exists bundle._tree_diff(text, text, text);
drop function if exists bundle._tree_changes(text, text, text);
drop function if exists bundle._node_diff(text, text, text);
