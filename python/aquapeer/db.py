"""The one narrow adapter through which aquapeer's code reaches a database.

Inside the server it wraps ``plpy``; outside (tests, the command line) it
wraps a psycopg connection.  Both take SQL with ``$1``-style parameters and
return rows as dicts.
"""

import json

from .errors import DatabaseError


def _pg_type(value):
    """The parameter type plpy.prepare needs for a Python value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytea"
    if _binary_list(value):
        return "bytea[]"
    if isinstance(value, (dict, list)):
        return "jsonb"
    return "text"


def _binary_list(value):
    """A list of bytes goes as bytea[] (JSON cannot hold it); other lists go as jsonb."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, bytes) for v in value)


def quote_ident(name):
    """An SQL identifier, quoted (as quote_ident() does, always)."""
    return '"' + name.replace('"', '""') + '"'


def current_database(db):
    """(oid, name) of the database db is connected to."""
    row = db.query("select oid, datname::text as name from pg_catalog.pg_database "
                   "where datname = pg_catalog.current_database()")[0]
    return row["oid"], row["name"]


def _sqlstate(error):
    """The SQLSTATE of a plpy.SPIError: a class attribute for the codes PL/Python knows,
    otherwise only packed into spidata (as PostgreSQL's MAKE_SQLSTATE packs it)."""
    state = getattr(error, "sqlstate", None)
    if state:
        return state
    spidata = getattr(error, "spidata", None)
    code = spidata[0] if spidata else None
    if not isinstance(code, int):
        return None
    return "".join(chr(((code >> (6 * i)) & 0x3F) + ord("0")) for i in range(5))


def _spidata(error, index, name):
    """The detail (1) or hint (2) of a plpy.SPIError: PL/Python keeps them in spidata only."""
    spidata = getattr(error, "spidata", None)
    if spidata and len(spidata) > index:
        return spidata[index]
    return getattr(error, name, None)


def _pg_value(value):
    return json.dumps(value) if isinstance(value, (dict, list)) and not _binary_list(value) else value


class PlpyDatabase:
    """Database access inside the server, through PL/Python's plpy."""

    def __init__(self, plpy):
        self.plpy = plpy
        self._plans = {}

    def query(self, sql, args=()):
        try:
            if not args:
                return list(self.plpy.execute(sql))
            types = tuple(_pg_type(a) for a in args)
            plan = self._plans.get((sql, types))
            if plan is None:
                plan = self._plans[(sql, types)] = self.plpy.prepare(sql, list(types))
            return list(self.plpy.execute(plan, [_pg_value(a) for a in args]))
        except self.plpy.SPIError as e:
            raise DatabaseError(str(e.args[0]) if e.args else str(e), sqlstate=_sqlstate(e),
                                detail=_spidata(e, 1, "detail"), hint=_spidata(e, 2, "hint")) from None

    def scalar(self, sql, args=()):
        rows = self.query(sql, args)
        return next(iter(rows[0].values())) if rows else None

    def savepoint(self):
        """A context in which the statements are undone together if it raises."""
        return self.plpy.subtransaction()

    def commit(self):
        self.plpy.commit()

    def rollback(self):
        self.plpy.rollback()


class PsycopgDatabase:
    """Database access from a client, through a psycopg 3 connection."""

    def __init__(self, conn):
        import psycopg
        from psycopg.rows import dict_row

        self.conn = conn
        self._cursor = psycopg.RawCursor(conn, row_factory=dict_row)

    def query(self, sql, args=()):
        import psycopg

        try:
            cur = self._cursor.execute(sql, [_pg_value(a) for a in args])
        except psycopg.Error as e:
            diag = e.diag
            raise DatabaseError(diag.message_primary or str(e), sqlstate=e.sqlstate,
                                detail=diag.message_detail, hint=diag.message_hint) from e
        return cur.fetchall() if cur.description else []

    def scalar(self, sql, args=()):
        rows = self.query(sql, args)
        return next(iter(rows[0].values())) if rows else None

    def savepoint(self):
        """A context in which the statements are undone together if it raises."""
        return self.conn.transaction()

    def commit(self):
        self.conn.commit()

    def rollback(self):
        self.conn.rollback()
