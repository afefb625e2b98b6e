"""Live rows: one row of a table shared in real time with one friend (docs/live.md).

Its columns flow through replication (per-column last writer wins), except its text columns,
which merge by characters: each is a Y.Text document (pycrdt, the Python bindings of Yrs) that
both databases keep, and an UPDATE's change to it travels as the document's update.  text is the
pure part (a value's diff as document edits, a friend's update merged in); apply runs the
messages of topic aquapeer.live in an executor connected as the friend's role; expiry ends idle
shares and those of friends away too long, on the worker.
"""
