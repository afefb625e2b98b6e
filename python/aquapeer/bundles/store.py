"""Bundles in the database: committing what changed, and keeping commits received from
elsewhere (the SQL in schema bundle does the set-based work; this module signs and verifies).
See docs/bundles.md."""

import datetime
import json

from .. import friends
from ..errors import AquapeerError, DatabaseError
from ..net import wire
from . import commits


def _texts(n):
    """Parameter n, a JSON array of texts (as the adapter sends lists), as text[]."""
    return f"array(select pg_catalog.jsonb_array_elements_text(${n}::jsonb))"


def commit(db, name, message):
    """Commit what changed in the bundle's tables since its head; the new commit's id.  During a
    merge (bundle._integrate), once no conflict is left, the commit has two parents: the head
    and the commit merged; it ends the merge."""
    db.query("select bundle._bundle($1)", [name])
    # One commit at a time per bundle, and the bundle stays while its rows are written.  Nothing
    # keeps objects of it meanwhile either (pulls and imports lock it for key share): bundle._stage
    # inserts the blobs the store lacks without "on conflict".
    bundle = db.query("select head, checked_out from bundle.bundle where name = $1 for update", [name])[0]
    if bundle["head"] != bundle["checked_out"]:
        raise AquapeerError(f'bundle "{name}" has tables checked out from commit {bundle["checked_out"]}, '
                            f'not from its head {bundle["head"]} (an older commit was checked out, or a friend pushed)',
                            sqlstate="55000",
                            hint="Check the head out first: select bundle.checkout(name), with force => true "
                                 "to give up the changes made since.")
    head = bundle["head"]
    merging = db.query("select m.theirs, "
                       "(select count(*) from bundle.conflicts c where c.bundle = m.bundle) as conflicts "
                       "from bundle.merge m where m.bundle = $1", [name])
    if merging and merging[0]["conflicts"]:
        raise AquapeerError(f'bundle "{name}" has {merging[0]["conflicts"]} unresolved conflict(s) from the merge of '
                            f'commit {merging[0]["theirs"]}', sqlstate="55000",
                            hint="Resolve each (see select * from bundle.conflicts): "
                                 "select bundle.resolve(name, relation, "
                                 "key, column_name, 'ours' | 'theirs' | 'value', value); or give the merge up with "
                                 "bundle.merge_abort(name).")
    staged = db.query("select root, rows_changed from bundle._stage($1)", [name])[0]
    if staged["rows_changed"] == 0 and not merging:
        raise AquapeerError(f'nothing to commit in bundle "{name}": its rows are as its head has them',
                            sqlstate="55000", hint="See select * from bundle.status(name).")
    parents = ([head] if head else []) + ([merging[0]["theirs"]] if merging else [])
    me = friends.load_identity(db)
    new = commits.Commit(parents=parents, tree=staged["root"], author=me.peer_id,
                         message=message or "", time=commits.utc_time(datetime.datetime.now(datetime.UTC)),
                         rows_changed=staged["rows_changed"])
    _store(db, name, [(new, commits.sign(me, new))])
    db.query("update bundle.bundle set head = $2, checked_out = $2 where name = $1", [name, new.id])
    db.query("delete from bundle.merge where bundle = $1", [name])
    return new.id


def _store(db, name, signed):
    """Keep commits ([(Commit, its signed document)]) in the bundle's store, in two statements."""
    db.query("insert into bundle.object select $1, c.id, 'commit', c.data "
             "from unnest(" + _texts(2) + ", $3::bytea[]) c(id, data) on conflict do nothing",
             [name, [new.id for new, _ in signed], [new.encode() for new, _ in signed]])
    db.query("insert into bundle.commit select $1, c->>0, array(select jsonb_array_elements_text(c->1)), c->>2, "
             "c->>3, c->>4, (c->>5)::timestamptz, (c->>6)::bigint, c->7 "
             "from jsonb_array_elements($2::jsonb) c on conflict do nothing",
             [name, [[new.id, list(new.parents), new.tree, new.author, new.message, new.time, new.rows_changed,
                      document] for new, document in signed]])


def keep_commits(db, name, documents):
    """Verify signed commit documents received for a bundle and keep them; each commit's parents
    must be here or among them, and its tree must already be kept (bundle._promote).  How many
    were new."""
    if not isinstance(documents, list):
        raise commits.CommitError("commit documents come as a JSON array")
    received = {}
    for document in documents:
        new = commits.verify(document)
        received[new.id] = (new, document)
    known = {r["id"] for r in db.query(
        "select id from bundle.commit where bundle = $1 and id = any (" + _texts(2) + ")",
        [name, sorted({p for new, _ in received.values() for p in new.parents} | set(received))])}
    order = commits.parents_first({cid: new.parents for cid, (new, _) in received.items()}, known)
    if not order:
        return 0
    treeless = db.query("select c.id, c.tree from unnest(" + _texts(2) + ", " + _texts(3) + ") c(id, tree) "
                        "where not exists (select from bundle.object o where o.bundle = $1 and o.id = c.tree "
                        "and o.kind = 'root') order by c.id limit 1",
                        [name, order, [received[cid][0].tree for cid in order]])
    if treeless:
        raise commits.CommitError(f"commit {treeless[0]['id']} refers to tree {treeless[0]['tree']}, which bundle "
                                  f'"{name}" lacks', hint="Its objects must be kept before it (pull again).")
    _store(db, name, [received[cid] for cid in order])
    return len(order)


# --- transfers: what executors do for transfer.py ----------------------------------------------

# What one objects answer holds at most before compression (less when the friend accepts less in
# one frame); the asker asks again for the rest.
SERVE_RAW_LIMIT = 4 * 1024 * 1024


def serve(db, args):
    """A friend's bundle_get, in an executor connected as the friend's role: the packed body."""
    name, friend, granted = args["bundle"], args["friend"], bool(args["granted"])
    want, ids = args["want"], [i.hex() for i in args["ids"]]
    if want == "head":
        value = json.loads(db.scalar("select peer._serve_bundle_head($1, $2, $3)::text", [name, friend, granted]))
        if value.get("format") != commits.FORMATS[0] and args["protocol"] < wire.FORMAT2_PROTOCOL:
            # (Only the message and SQLSTATE reach the friend.)
            raise AquapeerError(
                f'bundle "{name}" has commits of object format {value.get("format")}, which the aquapeer of '
                f'{friend} (protocol {args["protocol"]}) cannot read: update it to 0.17.0 or later', sqlstate="0A000")
    elif want == "commits":
        # From protocol 4, newest first and as many as one answer holds (at least one), counted
        # in SQL: a page of a long history need not carry the rest of it into Python.
        value = [json.loads(r["d"]) for r in db.query(
            "select c.d from (select d::text as d, n, sum(octet_length(d::text)) over (order by n) as upto "
            "from peer._serve_bundle_commits($1, $2, $3, " + _texts(4) + ", nullif(" + _texts(5) + ", '{}')) "
            "with ordinality c(d, n)) c where $6 or c.n = 1 or c.upto <= $7 order by c.n",
            [name, friend, granted, ids, [i.hex() for i in args.get("starts") or []],
             args["protocol"] < wire.LARGE_TRANSFERS_PROTOCOL, args["limit"]])]
    elif want == "objects":
        found = _served_objects(db, args, ids)  # in id order
        value, size = [], 0
        bare = args["protocol"] >= wire.BARE_OBJECTS_PROTOCOL  # answers in the order asked, without ids
        for i in (ids if bare else list(found)):
            data = found.get(i)
            if data is not None and len(data) > args["limit"]:
                if args["protocol"] >= wire.LARGE_TRANSFERS_PROTOCOL:  # its size: the friend asks for slices
                    value.append(len(data))
                    continue
                if not value:
                    raise AquapeerError(
                        f'an object of bundle "{name}" ({i}) is {len(data)} bytes, more than one answer to '
                        f"you may hold ({args['limit']})", sqlstate="54000",
                        hint="Update aquapeer, whose pulls fetch such objects in slices.")
                break
            if value and size + len(data or b"") > args["limit"]:
                break
            value.append(data if bare else [bytes.fromhex(i), data])
            size += len(data or b"")
        if args.get("blobs") and args["protocol"] >= wire.BUCKET_BLOBS_PROTOCOL:
            value = _with_blobs(db, args, value)
    elif want == "slice":  # protocol 4: the bytes of one object from offset on
        value = db.scalar("select substring(o.data from $5::integer + 1 for $6::integer) "
                          "from peer._serve_bundle_objects($1, $2, $3, " + _texts(4) + ") o",
                          [name, friend, granted, ids[:1], args["offset"], args["limit"]])
    else:  # push: may this friend push to the bundle?
        db.query("select peer._check_bundle_served($1, $2, false, true)", [name, friend])
        value = True
    return wire.pack_body(value, args["protocol"])


def _served_objects(db, args, ids):
    """{id: bytes} of the objects of the bundle a friend asked for that it may read."""
    return {row["id"]: row["data"] for row in db.query(
        "select id, data from peer._serve_bundle_objects($1, $2, $3, " + _texts(4) + ")",
        [args["bundle"], args["friend"], bool(args["granted"]), ids])}


BUCKET_HEADER = b"aquapeer-bucket/1\n"
BUCKET2_HEADER = b"aquapeer-bucket/2\n"


def _bucket_blob_ids(data):
    """The ids of the blobs a bucket names, in the order of its lines (as bundle._new_children
    reads them), or None for an object that is not a bucket."""
    if not isinstance(data, bytes) or not data.startswith(BUCKET_HEADER):
        return None
    return [line[-64:].decode("ascii", "replace") for line in data[len(BUCKET_HEADER):].split(b"\n") if line]


def _with_blobs(db, args, answered):
    """[objects, blobs] (protocol 5): the objects answered, as many as one answer holds with the
    blobs of those that are buckets; nil in place of blobs the friend must ask for by id (a
    bucket that would not fit in an answer with them, or blobs missing here)."""
    named = [_bucket_blob_ids(o) for o in answered]
    found = _served_objects(db, args, sorted({i for n in named if n for i in n}))
    objects, blobs, size = [], [], 0
    for data, ids in zip(answered, named, strict=True):
        carried = [found.get(i) for i in ids] if ids else None
        if carried is not None and (None in carried or len(data) + sum(map(len, carried)) > args["limit"]):
            carried = None
        more = (len(data) if isinstance(data, bytes) else 0) + sum(map(len, carried or []))
        if objects and size + more > args["limit"]:
            break
        objects.append(data)
        blobs.append(carried)
        size += more
    return [objects, blobs]


def _objects(body, asked, bare):
    """(ids, bytes, [(id, size)] of objects to fetch in slices) of an objects answer to the ids
    asked: by position, nil for an object the friend lacks, its size for one larger than an
    answer (protocol 4), perhaps ending early (protocol 3, bare); or [32-byte id, bytes] pairs (2)."""
    if bare:
        if not isinstance(body, list) or len(body) > len(asked) or not all(
                o is None or isinstance(o, bytes) or (wire._is_int(o) and o > 0) for o in body):
            raise wire.WireError("an objects answer is a list of bytes, sizes or nil, at most one per id asked")
        answered = [(i, o) for i, o in zip(asked, body, strict=False) if isinstance(o, bytes)]
        return ([i for i, _ in answered], [o for _, o in answered],
                [(i, o) for i, o in zip(asked, body, strict=False) if wire._is_int(o)])
    if not isinstance(body, list) or not all(
            isinstance(o, list) and len(o) == 2 and isinstance(o[0], bytes) and len(o[0]) == 32
            and isinstance(o[1], bytes) for o in body):
        raise wire.WireError("an objects answer is a list of [32-byte id, bytes]")
    return [o[0].hex() for o in body], [o[1] for o in body], []


def _carried_blobs(objects, blobs):
    """(ids, bytes) of the blobs an answer with blobs (protocol 5) carries: each bucket's, in the
    order of its lines, the ids as the bucket names them (bundle._keep checks both)."""
    if not isinstance(blobs, list) or len(blobs) != len(objects):
        raise wire.WireError("an objects answer with blobs has a list of blobs or nil for each object")
    ids, datas = [], []
    for data, carried in zip(objects, blobs, strict=True):
        if carried is None:
            continue
        named = _bucket_blob_ids(data)
        if named is None or not isinstance(carried, list) or len(carried) != len(named) or not all(
                isinstance(b, bytes) for b in carried):
            raise wire.WireError("an objects answer with blobs carries a blob for each line of a bucket, "
                                 "and none for another object")
        ids += named
        datas += carried
    return ids, datas


def _progress(db, transfer, **counts):
    db.query("update peer.transfer set bytes_done = bytes_done + $2, rows_done = rows_done + $3, "
             "objects_done = objects_done + $4, updated_at = now() where id = $1::uuid",
             [transfer, counts.get("bytes", 0), counts.get("rows", 0), counts.get("objects", 0)])


def _keep(db, name, transfer, ids, datas, places, wire_bytes):
    """Keep objects received (bundle._keep checks each against its id) and count them in the
    transfer's progress: the [id, place] of the children they name that we lack.  (An answer may
    hold none: only the sizes of objects to fetch in slices.)"""
    lacking = [] if not ids else [[r["id"], r["place"]] for r in db.query(
        "select id, place from bundle._keep($1, " + _texts(2) + ", $3, " + _texts(4) + ")",
        [name, ids, datas, places])]
    # Rows: blobs (as bundle._kind tells them), and the rows buckets of format 2 bring.
    rows = sum(1 for d in datas if not d.startswith(b"aquapeer-"))
    holding = [(i, p) for i, p, d in zip(ids, places, datas, strict=True) if d.startswith(BUCKET2_HEADER)]
    if holding:
        rows += db.scalar("select bundle._new_rows($1, " + _texts(2) + ", " + _texts(3) + ")",
                          [name, [i for i, _ in holding], [p for _, p in holding]])
    _progress(db, transfer, bytes=wire_bytes, rows=rows, objects=len(ids))
    return lacking


def _create(db, name):
    """The bundle made to exist here; whether it is new."""
    return bool(db.query("insert into bundle.bundle (name) values ($1) on conflict do nothing returning 1", [name]))


def store(db, args):
    """A step of a transfer's local side, in an executor connected as the worker's role (which
    commits each step, so what was kept stays kept whatever happens to the transfer later)."""
    step, name = args["step"], args["bundle"]
    if step == "prepare":  # the bundle must exist before its objects can be kept
        _create(db, name)
        return [r["id"] for r in db.query("select id from bundle.commit where bundle = $1 order by committed_at desc "
                                          f"limit {wire.MAX_ITEMS}", [name])]
    if step == "create":  # whether the bundle is new here
        return _create(db, name)
    if step == "forget_new":  # a bundle "create" made, for a pull refused before anything was kept
        db.query("delete from bundle.bundle b where b.name = $1 and b.head is null and b.checked_out is null "
                 "and not exists (select from bundle.tracked k where k.bundle = b.name) "
                 "and not exists (select from bundle.object o where o.bundle = b.name) "
                 "and not exists (select from bundle.pending p where p.bundle = b.name)", [name])
        return None
    if step == "head":
        return db.scalar("select head from bundle._bundle($1)", [name])
    if step == "unknown_commits":  # of these, the commits the bundle lacks
        return [r["id"] for r in db.query(
            "select i as id from unnest(" + _texts(2) + ") i "
            "where not exists (select from bundle.commit c where c.bundle = $1 and c.id = i) order by 1",
            [name, args["ids"]])]
    if step == "start":
        db.query("insert into peer.transfer (id, friend, bundle, direction, rows_total) "
                 "values ($1::uuid, $2, $3, $4, $5)",
                 [args["transfer"], args["friend"], name, args["direction"], args["rows_total"]])
        return None
    # Objects travel here as [id, place] (bundle._pending_walk says what a place is).
    if step == "lacking":
        return [[r["id"], r["place"]] for r in db.query(
            "select id, place from bundle._lacking($1, " + _texts(2) + ", " + _texts(3) + ")",
            [name, [i for i, _ in args["objects"]], [p for _, p in args["objects"]]])]
    if step == "keep":
        body = wire.unpack_body(args["data"], wire.BODY_LIMIT)
        with_blobs = bool(args.get("blobs"))
        if with_blobs and not (isinstance(body, list) and len(body) == 2):
            raise wire.WireError("an objects answer with blobs is [objects, blobs]")
        ids, datas, sliced = _objects(body[0] if with_blobs else body, [a[0] for a in args["asked"]], args["bare"])
        blob_ids, blobs = _carried_blobs(*body) if with_blobs else ([], [])
        place = dict(args["asked"])
        # A bucket and its blobs in one call: bundle._keep keeps a bucket all of whose blobs are
        # here in the store at once (nothing below it left to check).
        lacking = _keep(db, name, args["transfer"], ids + blob_ids, datas + blobs,
                        [place.get(i) for i in ids] + [None] * len(blob_ids), len(args["data"]))
        answered = set(ids) | {i for i, _ in sliced}
        return {"lacking": lacking, "unanswered": [a for a in args["asked"] if a[0] not in answered],
                "sliced": [[i, place.get(i), size] for i, size in sliced]}
    if step == "keep_sliced":  # one object, put together from its slices
        return {"lacking": _keep(db, name, args["transfer"], [args["object"][0]], [args["data"]],
                                 [args["object"][1]], args["wire_bytes"])}
    if step == "finish":
        db.query("select bundle._promote($1, " + _texts(2) + ")", [name, args["roots"]])
        kept = keep_commits(db, name, args["documents"])
        # clock_timestamp(): this step's transaction began before it kept the nodes and commits
        # (seconds for a large tree), and the transfer ends when they are kept.
        db.query("update peer.transfer set state = 'done', commits = $2, finished_at = clock_timestamp(), "
                 "updated_at = clock_timestamp() "
                 "where id = $1::uuid", [args["transfer"], kept])
        return kept
    if step == "end":
        db.query("update peer.transfer set state = $2, error = $3, finished_at = clock_timestamp(), "
                 "updated_at = clock_timestamp() "
                 "where id = $1::uuid and state = 'running'", [args["transfer"], args["state"], args["error"]])
        return None
    if step == "fast_forward":  # a friend's push: only ever forward, never touching the tables
        return json.loads(db.scalar("select bundle._integrate($1, $2, false)::text", [name, args["head"]]))
    if step == "contains":  # is commit the head or one of its ancestors here?
        return db.scalar("select exists (select from bundle.log($1) where commit_id = $2)", [name, args["commit"]])
    raise AquapeerError(f"unknown transfer step {step!r}")


# --- pulling and pushing: the caller's side ----------------------------------------------------

# How long a pull or push may take at most: it is cancelled like any statement before that.
TRANSFER_TIMEOUT_S = 24 * 3600.0


def transfer_progress(db, transfer):
    rows = db.query("select bytes_done, objects_done, rows_done, rows_total from peer.transfer where id = $1::uuid",
                    [transfer])
    return rows[0] if rows else {"bytes_done": 0, "objects_done": 0, "rows_done": 0, "rows_total": None}


def pull(db, client, friend, name, checkout, transfer):
    """Fetch what the friend has of the bundle and we lack (kept whatever happens next), then in
    the caller's transaction: track its tables if it is new here, fast-forward or merge, check out."""
    friends.check_name(friend)
    local = db.query("select head, exists (select from bundle.tracked t where t.bundle = b.name) as tracked "
                     "from bundle.bundle b where b.name = $1", [name])
    if local and checkout and db.scalar("select exists (select from bundle.status($1))", [name]):
        raise AquapeerError(f'bundle "{name}" has uncommitted changes in its tables', sqlstate="55000",
                            hint="Commit them with bundle.commit first, or pull with checkout => false "
                                 "to only fetch.")
    theirs = client.request("bundle_head", {"name": friend, "bundle": name}, timeout=120.0)
    if not (local and local[0]["tracked"]):
        try:
            db.query("select bundle._adopt($1, $2::jsonb)", [name, json.dumps(theirs["tables"])])
        except DatabaseError:
            if not local:  # refused before anything was fetched: the bundle made for it goes too
                client.request("bundle_forget_new", {"bundle": name}, timeout=120.0)
            raise
    summary = {"commits": 0, "blobs": 0, "objects": 0, "bytes": 0, "head": local[0]["head"] if local else None,
               "fast_forward": False, "up_to_date": True, "conflicts": 0, "merging": False, "transfer": None}
    if theirs["head"] is None:
        return summary
    fetched = client.request("pull", {"name": friend, "bundle": name, "transfer": transfer},
                             timeout=TRANSFER_TIMEOUT_S)
    done = transfer_progress(db, transfer)
    merged = json.loads(db.scalar("select bundle._integrate($1, $2, $3)::text", [name, theirs["head"], checkout]))
    summary.update(commits=fetched["commits"], blobs=done["rows_done"], objects=done["objects_done"],
                   bytes=done["bytes_done"], transfer=transfer, **{k: merged[k] for k in (
                       "head", "fast_forward", "up_to_date", "conflicts", "merging") if k in merged})
    return summary


def push(db, client, friend, name):
    """Have the friend take our commits of the bundle (fast-forward only); its summary."""
    friends.check_name(friend)
    db.query("select from bundle._bundle($1)", [name])  # it must exist here
    return client.request("push", {"name": friend, "bundle": name}, timeout=TRANSFER_TIMEOUT_S)

