"""Live replication: tables published to friends, their changes applied as they arrive.

Capture is C (src/capture.c: peer._capture_changes, a statement trigger queuing changes as
messages on topic aquapeer.changes); delivery is the message stream's; resolve
is pure (per-column last writer wins by hybrid logical clock); apply runs in an
executor connected as the sending friend's role.  See docs/replication.md.
"""
