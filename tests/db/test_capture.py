"""peer._capture_changes (src/capture.c), the trigger of a published table, held to a reference
written here in Python: for each statement, the changes queued to the friend are exactly those
that turn the table as it was into the table as it is (inserted rows whole, updated rows' changed
columns, deleted rows' keys), 1,000 to a message.  The friend never connects, so what was queued
stays in peer.outbox_message.  Friend "ghost" gets every column of every row; "picky" the columns
PICKY_COLUMNS of the rows where n > 3.  (Applying them: tests/net/test_replication.py.)"""

import json

import pytest

from aquapeer import identity

TABLE = "public.captured"
KEY = ("region", "id")
PICKY_COLUMNS = ["region", "id", "n", "doc"]


@pytest.fixture(scope="module")
def published(worker_cluster):
    c = worker_cluster
    for name in ("ghost", "picky"):
        invite = identity.make_invite(identity.Identity.generate(), [], name)
        c.sql("select peer.add_friend(%s::text, %s)", name, invite)
    # Columns named like the old capture query's aliases (n, o), one dropped, a composite key (checked
    # at the end of each statement, so that keys can be swapped), a toasted value.
    c.sql(f"""create table {TABLE} (id int, gone text, n int, o int, doc jsonb, note text, at timestamptz,
                                    region text, primary key (region, id) deferrable)""")
    c.sql(f"alter table {TABLE} drop column gone")
    c.sql(f"select peer.publish('{TABLE}', 'ghost')")
    c.sql(f"select peer.publish('{TABLE}', 'picky', %s, 'n > 3')", PICKY_COLUMNS)
    return c


def snapshot(c):
    return {tuple(row[k] for k in KEY): row for (row,) in c.sql(f"select to_jsonb(t) from {TABLE} t")}


def reference_changes(before, after, columns=None, selects=lambda row: True):
    """The changes that turn before into after, as the capture must queue them: {key: row} each;
    only the rows selects selects (as they are after the change, or before a delete), only columns."""
    def key_of(row):
        return {k: row[k] for k in KEY}

    def only(values):
        return {c: v for c, v in values.items() if columns is None or c in columns}
    changes = [{"op": "I", "k": key_of(after[k]), "v": only(after[k])}
               for k in after.keys() - before.keys() if selects(after[k])]
    changes += [{"op": "D", "k": key_of(before[k])} for k in before.keys() - after.keys() if selects(before[k])]
    for k in after.keys() & before.keys():
        changed = only({c: v for c, v in after[k].items() if before[k][c] != v})
        if changed and selects(after[k]):
            changes.append({"op": "U", "k": key_of(after[k]), "v": changed})
    return changes


def canonical(changes):
    return sorted(json.dumps(c, sort_keys=True) for c in changes)


def captured(c, statement):
    """Run statement; the messages of changes it queued to ghost, after checking them and picky's."""
    c.sql("delete from peer.outbox_message")
    before = snapshot(c)
    c.sql(statement)
    after = snapshot(c)
    origin = c.scalar("select peer_id from peer.identity")
    messages = {"ghost": [], "picky": []}
    for friend, m in c.sql("select friend, payload from peer.outbox_message "
                           "where topic = 'aquapeer.changes' order by position"):
        assert m["r"] == TABLE and m["o"] == origin and m["c"] > 0
        assert 0 < len(m["rows"]) <= 1000
        messages[friend].append(m)
    sent = {friend: [change for m in ms for change in m["rows"]] for friend, ms in messages.items()}
    assert canonical(sent["ghost"]) == canonical(reference_changes(before, after))
    assert canonical(sent["picky"]) == canonical(
        reference_changes(before, after, PICKY_COLUMNS, lambda row: row["n"] is not None and row["n"] > 3))
    return messages["ghost"]


def test_inserts_go_whole_in_messages_of_a_thousand(published):
    messages = captured(published, f"""insert into {TABLE} (region, id, n, o, doc, note, at)
        select case when g % 2 = 0 then 'east' else 'west' end, g, g % 7, null,
               jsonb_build_object('g', g, 'list', jsonb_build_array(g, 'x', null)),
               case when g = 1 then repeat('long text ', 100000) else 'row ' || g end, '2026-12-06 10:00+00'
        from generate_series(1, 2500) g""")
    assert [len(m["rows"]) for m in messages] == [1000, 1000, 500]


def test_updates_send_only_the_columns_that_changed(published):
    # null to a value and back, a jsonb value, next to an unchanged toasted text
    captured(published, f"""update {TABLE} set o = case when id % 3 = 0 then 1 end, doc = doc || '{{"more": true}}'
                            where id <= 300""")
    captured(published, f"update {TABLE} set note = note || '!' where id = 1")


def test_an_update_that_changes_nothing_sends_nothing(published):
    assert captured(published, f"update {TABLE} set n = n, note = note where id <= 100") == []


def test_an_update_of_keys_deletes_the_old_keys_and_inserts_the_new(published):
    captured(published, f"update {TABLE} set id = id + 100000 where id between 10 and 20")
    # keys swapped: both stay, so each is an update of the other's values
    captured(published, f"update {TABLE} set id = case id when 31 then 33 else 31 end where id in (31, 33)")
    # a key moved onto one freed in the same statement: the kept key is updated
    captured(published, f"update {TABLE} set id = id + 2 where region = 'east' and id between 2400 and 2500")


def test_deletes_send_the_keys(published):
    captured(published, f"delete from {TABLE} where id > 2000 or id = 1")


def test_a_friends_changes_being_applied_are_not_stamped_anew(published):
    """Applying a friend's changes (peer.applying_from set) is only for an executor: a session
    that claims it is refused, and nothing is queued."""
    published.sql("delete from peer.outbox_message")
    with published.connect() as conn, pytest.raises(Exception, match="executor"):
        conn.execute("select set_config('peer.applying_from', 'someone', false)")
        conn.execute(f"update {TABLE} set n = n + 1 where id = 2")
    assert published.scalar("select count(*) from peer.outbox_message") == 0


def test_a_table_friends_also_write_to_is_stamped(published):
    """Subscribed from a friend too, each local change stamps the key's columns in peer.row_clock
    with the clock its message carries."""
    c = published
    c.sql(f"select peer.subscribe('{TABLE}', 'ghost', initial => false)")
    try:
        [message] = captured(c, f"update {TABLE} set n = 42 where region = 'east' and id = 4")
        columns, born = c.sql("select columns, born from peer.row_clock where relation = %s::regclass "
                              "and key = %s::jsonb", TABLE, json.dumps({"region": "east", "id": 4}))[0]
        assert columns == {"n": [message["c"], message["o"]]} and born is None
    finally:
        c.sql(f"select peer.unsubscribe('{TABLE}', 'ghost')")


def peak_private_memory_kb(pid):
    """The backend's peak memory less the shared buffers and files it has mapped since: those stay
    mapped, so this is its own memory at its peak, near enough."""
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    return sum(int(status[k].split()[0]) * sign for k, sign in (("VmHWM", 1), ("RssFile", -1), ("RssShmem", -1)))


def test_a_large_statement_is_captured_in_bounded_memory(published):
    """The writing backend's peak memory does not grow with the statement: 300,000 updated rows
    peak within a few MB of 30,000 (capture matching rows by key as jsonb took 120 MB more)."""
    c = published
    c.sql("create table public.wide (id int primary key, n int, pad text)")
    try:
        c.sql("insert into public.wide select g, 0, repeat('x', 200) from generate_series(1, 300000) g")
        c.sql("select peer.publish('public.wide', 'ghost')")
        peaks = {}
        for rows in (30_000, 300_000):
            with c.connect() as conn:
                pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                conn.execute("update public.wide set n = n + 1 where id <= %s", [rows])
                peaks[rows] = peak_private_memory_kb(pid)
            assert c.scalar("select sum(jsonb_array_length(payload -> 'rows')) from peer.outbox_message "
                            "where friend = 'ghost' and payload ->> 'r' = 'public.wide'") == rows
            c.sql("delete from peer.outbox_message")
        assert peaks[300_000] - peaks[30_000] < 16 * 1024, peaks
    finally:
        c.sql("drop table public.wide")
        c.sql("delete from peer.publication where relation::text = 'public.wide'")
