"""The plpy side of the database adapter, with a recording stand-in for plpy's API."""

import pytest

from aquapeer.db import PlpyDatabase
from aquapeer.errors import DatabaseError


class RecordingPlpy:
    class SPIError(Exception):
        sqlstate = "22012"

    def __init__(self):
        self.prepared = []

    def prepare(self, sql, types):
        self.prepared.append((sql, types))
        return (sql, tuple(types))

    def execute(self, plan, args=None):
        if plan == "fail":
            raise self.SPIError("division by zero")
        return [{"plan": plan, "args": args}]


def test_parameter_types_follow_python_types_and_plans_are_reused():
    plpy = RecordingPlpy()
    db = PlpyDatabase(plpy)
    rows = db.query("select $1, $2, $3, $4, $5", [True, 3, 1.5, b"x", {"a": 1}])
    db.query("select $1, $2, $3, $4, $5", [False, 4, 2.5, b"y", [1]])
    assert plpy.prepared == [("select $1, $2, $3, $4, $5",
                              ["boolean", "bigint", "double precision", "bytea", "jsonb"])]
    assert rows[0]["args"] == [True, 3, 1.5, b"x", '{"a": 1}']


def test_errors_carry_their_sqlstate():
    db = PlpyDatabase(RecordingPlpy())
    with pytest.raises(DatabaseError) as info:
        db.query("fail")
    assert info.value.sqlstate == "22012"


def test_a_sqlstate_plpy_has_no_class_for_is_unpacked_from_spidata():
    from aquapeer.db import _sqlstate

    class SPIError(Exception):
        pass

    def packed(state):  # PostgreSQL's MAKE_SQLSTATE
        return sum(((ord(c) - ord("0")) & 0x3F) << (6 * i) for i, c in enumerate(state))

    error = SPIError("custom")
    error.spidata = (packed("AQ123"), None, None, None, 0)
    assert _sqlstate(error) == "AQ123"
    assert _sqlstate(SPIError("no data")) is None
