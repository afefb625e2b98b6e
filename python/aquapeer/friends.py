"""Identity and friends kept in the database, behind the db adapter.

The worker's PeerNode reads friends through DbFriendBook; the SQL
functions add, accept, block and remove friends through the functions
below.  Every write commits at once,
so the worker never sits on a transaction.
"""

import dataclasses
import json
import re
import time

from . import identity, introductions
from .errors import AquapeerError

NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,63}")
# A stranger's attempts are written at most this often per peer id, and at
# most REQUESTS_PER_SECOND in all: new keys are free to make.
REQUEST_WRITE_INTERVAL_S = 10.0
REQUESTS_PER_SECOND = 20
SEEN_WRITE_INTERVAL_S = 60.0


@dataclasses.dataclass
class Friend:
    peer_id: str
    name: str
    chain: identity.KeyChain
    accepted: bool = True
    auto_connect: bool = True
    signal_url: str = None   # reach this friend through another signaling server
    stun_url: str = None     # try this STUN server first for this friend


def load_identity(db):
    row = db.query("select secret from peer.identity")
    if not row:
        raise AquapeerError("this database has no aquapeer identity",
                            hint="Run select peer.reset_identity() as the extension owner.")
    return identity.Identity.from_secret(bytes(row[0]["secret"]))


def store_identity(db, me, rotated=False):
    db.query("delete from peer.identity")
    db.query("insert into peer.identity (peer_id, secret, rotated_at) "
             "values ($1, $2, case when $3 then pg_catalog.now() end)",
             [me.peer_id, me.to_secret(), rotated])


def signal_urls(db):
    """This database's signaling servers, the preferred one first."""
    return [r["url"] for r in db.query(
        "select s.url from peer.signal_server s left join peer.config c on c.signal_server_id = s.id "
        "order by c.signal_server_id is null, s.priority, s.id")]


def check_name(name):
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AquapeerError(f"invalid friend name {name!r}",
                            hint="Use 1 to 63 lower-case letters, digits, '_' or '-'.", sqlstate="22023")


def _insert_friend(db, name, chain, urls, introduced_by=None):
    check_name(name)
    me = db.scalar("select peer_id from peer.identity")
    if chain.peer_id == me:
        raise AquapeerError("that invite is this database's own", sqlstate="22023",
                            hint="Add the invite of the other database, from its select peer.invite().")
    clash = db.query("select name, peer_id from peer.friend where name = $1 or peer_id = $2", [name, chain.peer_id])
    for row in clash:
        if row["name"] == name:
            raise AquapeerError(f'the friend name "{name}" is already in use', sqlstate="23505",
                                hint="Choose another name, or peer.remove_friend() the old one first.")
        raise AquapeerError(f'this peer is already your friend "{row["name"]}"', sqlstate="23505",
                            detail=f"peer id {chain.peer_id}")
    db.query("insert into peer.friend (name, peer_id, chain, signal_urls, introduced_by) values ($1, $2, $3, "
             "array(select pg_catalog.jsonb_array_elements_text($4::jsonb)), $5)",
             [name, chain.peer_id, chain.to_bytes(), list(urls), introduced_by])
    db.query("delete from peer.friend_request where peer_id = $1", [chain.peer_id])
    return chain.peer_id


def add_friend(db, name, invite_text):
    invite = identity.parse_invite(invite_text)
    return _insert_friend(db, name, invite.chain, invite.signal_urls)


def accept_friend(db, peer_id, name):
    peer_id = identity.parse_peer_id(peer_id)
    row = db.query("select chain, signal_urls, introduced_by from peer.friend_request where peer_id = $1", [peer_id])
    if not row:
        raise AquapeerError(f"no friend request from {peer_id}", sqlstate="42704",
                            hint="See select * from peer.friend_requests, or add it with peer.add_friend().")
    chain = identity.KeyChain.from_bytes(row[0]["chain"], expected_peer_id=peer_id)
    return _insert_friend(db, name, chain, row[0]["signal_urls"] or [], row[0]["introduced_by"])


def display_name(db):
    """The name this database gives itself to others: peer.config.display_name, else the database's."""
    return db.scalar("select coalesce(display_name, pg_catalog.current_database()::text) from peer.config")


# --- introductions ---------------------------------------------------------

def introduce(db, me, friend_a, friend_b, note):
    """Queue to each of two friends a signed introduction of the other (in the caller's transaction)."""
    a, b = (_friend_to_introduce(db, name) for name in (friend_a, friend_b))
    if a["peer_id"] == b["peer_id"]:
        raise AquapeerError("a friend cannot be introduced to itself", sqlstate="22023",
                            hint="Name two different friends.")
    own_urls = signal_urls(db)
    mine = display_name(db)
    for to, other in ((a, b), (b, a)):
        chain = identity.KeyChain.from_bytes(other["chain"], expected_peer_id=other["peer_id"])
        payload = introductions.make(me, to["peer_id"], chain, other["signal_urls"] or own_urls,
                                     other["name"], mine, note)
        db.query("select peer.send($1, $2, $3::jsonb)", [to["name"], introductions.TOPIC, json.dumps(payload)])


def _friend_to_introduce(db, name):
    """An accepted friend's name, peer id, chain and signaling URLs (peer._friend_for_sending
    refuses an unknown or blocked one)."""
    return db.query("select f.name, f.peer_id, f.chain, "
                    "coalesce(nullif(f.signal_urls, '{}'), array(select s.url from peer.signal_server s "
                    "where s.id = f.signal_server_id)) as signal_urls from peer._friend_for_sending($1) f",
                    [name])[0]


def receive_introduction(db, friend, message_id):
    """The handler of topic aquapeer.introduce, in an executor connected as the introducer's role:
    a checked introduction becomes a friend when the introducer is trusted to introduce
    (peer.set_introducer), otherwise a friend request.  What it did, as text."""
    introducer = db.query("select f.peer_id, f.chain, f.introducer from peer._applying_friend($1) f", [friend])[0]
    payload = db.scalar("select payload::text from peer.inbox where id = $1::uuid and friend = $2 and topic = $3",
                        [message_id, friend, introductions.TOPIC])
    if payload is None:
        raise AquapeerError(f'no introduction {message_id} from "{friend}" in peer.inbox', sqlstate="42704")
    me = db.scalar("select peer_id from peer.identity")
    intro = introductions.open_(json.loads(payload), identity.KeyChain.from_bytes(introducer["chain"]), me)
    if intro.peer_id == me:
        return "ignored: it introduces this database"
    known = db.query("select name, state from peer.friend where peer_id = $1", [intro.peer_id])
    if known:
        return f'ignored: already {"blocked" if known[0]["state"] == "blocked" else "friend"} "{known[0]["name"]}"'
    if introducer["introducer"]:
        name = _free_name(db, intro.introduced_as or intro.peer_id[:7].lower())
        _insert_friend(db, name, intro.chain, intro.signal_urls, introducer["peer_id"])
        return f'accepted as friend "{name}"'
    db.query(
        "insert into peer.friend_request as r (peer_id, chain, introduced_by, introduced_as, note, signal_urls) "
        "values ($1, $2, $3, $4, $5, array(select pg_catalog.jsonb_array_elements_text($6::jsonb))) "
        "on conflict (peer_id) do update set introduced_by = excluded.introduced_by, "
        "introduced_as = excluded.introduced_as, note = excluded.note, signal_urls = excluded.signal_urls, "
        "last_seen = pg_catalog.now(), "
        # the longer of two valid chains of one peer is the newer
        "chain = case when length(excluded.chain) > length(r.chain) then excluded.chain else r.chain end",
        [intro.peer_id, intro.chain.to_bytes(), introducer["peer_id"], intro.introduced_as, intro.note,
         json.dumps(intro.signal_urls)])
    _prune_requests(db)
    return "kept as a friend request"


def _prune_requests(db):
    """Keep the friend_request_limit requests seen last."""
    db.query("delete from peer.friend_request where peer_id in (select peer_id from peer.friend_request "
             "order by last_seen desc offset (select friend_request_limit from peer.config))")


def _free_name(db, wanted):
    """wanted as a valid friend name not in use here: lower-cased, other characters as '-', and
    a number appended when taken."""
    base = re.sub(r"[^a-z0-9_-]", "-", wanted.lower())[:56] or "friend"
    taken = {r["name"] for r in db.query("select name from peer.friend where name like $1 || '%'", [base])}
    return next(name for name in (base if n == 0 else f"{base}-{n}" for n in range(len(taken) + 1))
                if name not in taken)


def unknown_friend(name):
    return AquapeerError(f'unknown friend "{name}"', sqlstate="42704",
                         hint="See select * from peer.friends; add one with peer.add_friend().")


def friend_peer_id(db, name):
    peer_id = db.scalar("select peer_id from peer.friend where name = $1", [name])
    if peer_id is None:
        raise unknown_friend(name)
    return peer_id


class DbFriendBook:
    """The friend book the worker's PeerNode uses.

    It reads the table on every lookup (a few per connection, one every
    supervisor tick) rather than caching: a session's change becomes
    visible only when it commits, which the worker cannot be told about.
    """

    FRIEND_QUERY = ("select f.name, f.peer_id, f.chain, f.state, f.auto_connect, "
                    "s.url as signal_url, t.url as stun_url from peer.friend f "
                    "left join peer.signal_server s on s.id = f.signal_server_id "
                    "left join peer.stun_server t on t.id = f.stun_server_id ")

    def __init__(self, db):
        self.db = db
        self._request_writes = {}
        self._seen_writes = {}
        self._budget = (0, 0)  # (second, writes in it)
        self._chains = {}

    def _friends(self, where="", args=()):
        rows = self.db.query(self.FRIEND_QUERY + where, args)
        self.db.commit()
        return [Friend(r["peer_id"], r["name"], self._chain(bytes(r["chain"])),
                       r["state"] == "accepted", r["auto_connect"], r["signal_url"], r["stun_url"])
                for r in rows]

    def _chain(self, data):
        """Parsed chains, by their bytes: verifying one costs more than the query."""
        chain = self._chains.get(data)
        if chain is None:
            if len(self._chains) > 10000:
                self._chains.clear()
            chain = self._chains[data] = identity.KeyChain.from_bytes(data)
        return chain

    def by_name(self, name):
        return next(iter(self._friends("where f.name = $1", [name])), None)

    def lookup(self, peer_id):
        return next(iter(self._friends("where f.peer_id = $1", [peer_id])), None)

    def accepted(self):
        return self._friends("where f.state = 'accepted'")

    def everyone(self):
        return self._friends()

    def update_chain(self, peer_id, chain):
        self.db.query("update peer.friend set chain = $1 where peer_id = $2",
                      [chain.to_bytes(), peer_id])
        self.db.commit()

    def record_request(self, peer_id, claimed_name, chain):
        now = time.monotonic()
        if now - self._request_writes.get(peer_id, -1e9) < REQUEST_WRITE_INTERVAL_S:
            return
        second, writes = self._budget
        if int(now) == second and writes >= REQUESTS_PER_SECOND:
            return
        self._budget = (int(now), writes + 1 if int(now) == second else 1)
        self._request_writes[peer_id] = now
        if len(self._request_writes) > 10000:
            self._request_writes.clear()
        self.db.query(
            "insert into peer.friend_request as r (peer_id, claimed_name, chain) values ($1, $2, $3) "
            "on conflict (peer_id) do update set attempts = r.attempts + 1, last_seen = pg_catalog.now(), "
            "claimed_name = excluded.claimed_name",
            [peer_id, claimed_name, chain.to_bytes()])
        _prune_requests(self.db)
        self.db.commit()

    def seen(self, peer_id):
        now = time.monotonic()
        if now - self._seen_writes.get(peer_id, -1e9) < SEEN_WRITE_INTERVAL_S:
            return
        self._seen_writes[peer_id] = now
        self.db.query("update peer.friend set last_seen = pg_catalog.now() where peer_id = $1", [peer_id])
        self.db.commit()
