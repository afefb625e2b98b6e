"""Bundle commits: their canonical encoding, content-addressed ids and signatures (pure).

A commit names its parents (the first is the branch it was made on, a
second one makes it a merge), the root of its tree, its author's peer id, a
message, a time and how many rows it changed.  Its id is the SHA-256 of its
canonical encoding (format ``aquapeer-bundle/2``; commits made before it
keep ``aquapeer-bundle/1``; see docs/bundles.md): UTF-8 JSON with sorted
keys and no whitespace.  The author signs the id with the key the commit
records the index of, and the commit travels with the author's key chain,
so anybody can check it, not only the author's friends.
"""

import base64
import collections
import dataclasses
import datetime
import hashlib
import heapq
import json
import re

from .. import identity
from ..errors import AquapeerError

# New commits are of the newest format; those of the first keep it (and their ids).
FORMATS = ("aquapeer-bundle/1", "aquapeer-bundle/2")
FORMAT = FORMATS[-1]
COMMIT_DOMAIN = b"aquapeer-commit/1\0"
ID = re.compile(r"[0-9a-f]{64}")
MAX_MESSAGE = 10000


class CommitError(AquapeerError):
    sqlstate = "22023"  # invalid_parameter_value


def canonical_json(obj):
    """The bytes every side computes the same for the same JSON value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def object_id(data):
    """The id of an object's canonical bytes: SHA-256, lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def check_id(value, what):
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise CommitError(f"{what} is not an object id (64 lower-case hex digits): {str(value)[:80]!r}")
    return value


def utc_time(moment):
    """A commit's time: ISO 8601 in UTC with microseconds, so every server writes it the same."""
    if moment.tzinfo is None:
        raise CommitError("a commit time needs a time zone")
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class Commit:
    parents: tuple
    tree: str
    author: str
    message: str
    time: str
    rows_changed: int
    format: str = FORMAT

    def __post_init__(self):
        object.__setattr__(self, "parents", tuple(self.parents))
        for parent in self.parents:
            check_id(parent, "a parent")
        if len(self.parents) > 2 or len(set(self.parents)) != len(self.parents):
            raise CommitError("a commit has at most two parents, each once")
        check_id(self.tree, "the tree")
        if not isinstance(self.author, str) or identity.parse_peer_id(self.author) != self.author:
            raise CommitError(f"the author is not a peer id as aquapeer writes it: {str(self.author)[:80]!r}")
        if not isinstance(self.message, str) or len(self.message) > MAX_MESSAGE:
            raise CommitError(f"a commit message is text of at most {MAX_MESSAGE} characters")
        if not isinstance(self.time, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", self.time):
            raise CommitError(f"a commit time is ISO 8601 UTC with microseconds, not {str(self.time)[:40]!r}")
        if not isinstance(self.rows_changed, int) or isinstance(self.rows_changed, bool) or self.rows_changed < 0:
            raise CommitError("rows_changed is a count")
        if self.format not in FORMATS:
            raise CommitError(f"not a commit of format {' or '.join(FORMATS)}: {str(self.format)[:40]!r}",
                              hint="It may come from a newer aquapeer; update this one.")

    def body(self):
        return {"format": self.format, "parents": list(self.parents), "tree": self.tree, "author": self.author,
                "message": self.message, "time": self.time, "rows_changed": self.rows_changed}

    def encode(self):
        return canonical_json(self.body())

    @property
    def id(self):
        return object_id(self.encode())

    @classmethod
    def from_body(cls, body):
        if not isinstance(body, dict) or body.get("format") not in FORMATS:
            raise CommitError(f"not a commit of format {' or '.join(FORMATS)}",
                              hint="It may come from a newer aquapeer; update this one.")
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(body) != fields:
            raise CommitError(f"a commit has exactly the fields {sorted(fields)}")
        if not isinstance(body["parents"], list):
            raise CommitError("a commit's parents are a list")
        return cls(**{name: body[name] for name in fields})


def _signed_bytes(commit_id):
    return COMMIT_DOMAIN + bytes.fromhex(commit_id)


def sign(me, commit):
    """The commit as a document (JSON-ready) signed by me, who must be its author."""
    if commit.author != me.peer_id:
        raise CommitError("only the author signs a commit")
    commit_id = commit.id
    return {"type": "commit", "id": commit_id, "commit": commit.body(), "key_index": me.chain.index,
            "signature": base64.b64encode(me.sign(_signed_bytes(commit_id))).decode(),
            "chain": base64.b64encode(me.chain.to_bytes()).decode()}


def verify(document):
    """The Commit a signed document holds, once its id and its author's signature check out."""
    if not isinstance(document, dict) or document.get("type") != "commit":
        raise CommitError("not a commit document")
    commit = Commit.from_body(document.get("commit"))
    if document.get("id") != commit.id:
        raise CommitError(f"commit {str(document.get('id'))[:64]} does not match its content "
                          f"(it hashes to {commit.id})")
    try:
        chain = identity.KeyChain.from_bytes(base64.b64decode(document["chain"], validate=True),
                                             expected_peer_id=commit.author)
        signature = base64.b64decode(document["signature"], validate=True)
        index = document["key_index"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(chain):
            raise ValueError(f"no key {index!r} in the author's chain")
        key = chain.key_at(index)
    except (KeyError, TypeError, ValueError, IndexError, identity.IdentityError) as e:
        raise CommitError(f"commit {commit.id} has no usable signature or key chain of its author",
                          detail=str(e)) from None
    if not identity.verify(key, signature, _signed_bytes(commit.id)):
        raise CommitError(f"the signature of commit {commit.id} does not verify",
                          hint="Somebody altered it, or it was never signed by its author.")
    return commit


def parents_first(received, known):
    """The ids of the received commits (id -> its parents' ids) that are not known, each after
    its parents (ties by id): a topological sort in one pass, since a clone may receive a history
    of 100,000 commits.  CommitError for a commit whose parents are neither known nor received,
    or a cycle."""
    waiting = {cid: parents for cid, parents in received.items() if cid not in known}
    blocking = {}                           # id -> how many of its parents are still to come
    children = collections.defaultdict(list)
    for cid in sorted(waiting):
        to_come = {p for p in waiting[cid] if p not in known}
        lacking = sorted(p for p in to_come if p not in waiting)
        if lacking:
            raise CommitError(f"commit {cid} has parents this database lacks: {', '.join(lacking)}",
                              hint="The sender must send a commit's parents with it (pull again).")
        blocking[cid] = len(to_come)
        for p in to_come:
            children[p].append(cid)
    ready = [cid for cid, n in blocking.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        cid = heapq.heappop(ready)
        order.append(cid)
        for child in children[cid]:
            blocking[child] -= 1
            if not blocking[child]:
                heapq.heappush(ready, child)
    if len(order) < len(waiting):
        raise CommitError(f"commit {min(waiting.keys() - set(order))} has parents this database lacks: a cycle",
                          hint="The sender must send a commit's parents with it (pull again).")
    return order
