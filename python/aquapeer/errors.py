"""Errors that reach SQL callers with a SQLSTATE, a message and a hint."""


class AquapeerError(Exception):
    """An error a user can act on.  The SQL layer raises it as a PostgreSQL error."""

    sqlstate = "55000"  # object_not_in_prerequisite_state

    def __init__(self, message, *, hint=None, detail=None, sqlstate=None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail
        if sqlstate:
            self.sqlstate = sqlstate

    def as_dict(self):
        return {"message": self.message, "hint": self.hint, "detail": self.detail,
                "sqlstate": self.sqlstate}

    @classmethod
    def from_dict(cls, d):
        return cls(d.get("message") or "unknown error", hint=d.get("hint"),
                   detail=d.get("detail"), sqlstate=d.get("sqlstate"))


class WorkerUnavailable(AquapeerError):
    """The database's aquapeer worker cannot be reached."""


class RequestTimeout(AquapeerError):
    sqlstate = "57014"  # query_canceled


class DatabaseError(AquapeerError):
    """An error PostgreSQL raised for a statement the adapter ran."""

    def __init__(self, message, *, sqlstate=None, detail=None, hint=None):
        super().__init__(message, sqlstate=sqlstate or "XX000", detail=detail, hint=hint)


# Raised when aquapeer's own SQL objects are gone: the extension was dropped.
UNDEFINED_OBJECT_STATES = frozenset({"42883", "3F000", "42P01", "42704"})
