"""The control channel between SQL sessions and the database's worker.

A Unix-domain socket per database, ``pg_aquapeer/<database oid>.sock``
relative to the data directory (every backend's working directory, so the
path never nears the 107-byte limit).  The directory is mode 0700 and the
socket 0600, both owned by the server's operating-system user, and the
worker checks each caller's uid with SO_PEERCRED.

Frames are a 4-byte big-endian length and a msgpack map.  A request is
``{"id", "op", "args"}``; its answer ``{"id", "ok": true, "result"}`` or
``{"id", "ok": false, "error": {...}}``.
"""

import asyncio
import os
import select
import socket
import struct
import time

import msgpack

from .errors import AquapeerError, RequestTimeout, WorkerUnavailable

SOCKET_DIR = "pg_aquapeer"
MAX_FRAME = 128 * 1024 * 1024
_HEADER = struct.Struct(">I")


def socket_path(database_oid):
    return os.path.join(SOCKET_DIR, f"{int(database_oid)}.sock")


def encode_frame(message):
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise AquapeerError(f"control frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode_body(body):
    message = msgpack.unpackb(body, raw=False)
    if not isinstance(message, dict):
        raise AquapeerError("control frame is not a map")
    return message


def frame_length(header):
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise AquapeerError(f"control frame of {length} bytes exceeds {MAX_FRAME}")
    return length


# --- the worker's side (asyncio) -------------------------------------------

async def read_frame(reader):
    """The next message, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    return decode_body(await reader.readexactly(frame_length(header)))


async def write_frame(writer, message):
    writer.write(encode_frame(message))
    await writer.drain()


def peer_uid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def prepare_socket_dir():
    """Create the socket directory, or check that nobody else can use it."""
    os.makedirs(SOCKET_DIR, mode=0o700, exist_ok=True)
    st = os.lstat(SOCKET_DIR)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise AquapeerError(
            f"control socket directory {os.path.abspath(SOCKET_DIR)} must be owned by the "
            f"server's user and have mode 0700",
            hint="Remove it; the worker creates it again.")


async def start_server(database_oid, handle_connection):
    """Listen on the database's socket; handle_connection(reader, writer) per caller."""
    prepare_socket_dir()
    path = socket_path(database_oid)
    # One worker per database holds a lock, so a socket left here is stale.
    if os.path.exists(path):
        os.unlink(path)

    async def checked(reader, writer):
        sock = writer.get_extra_info("socket")
        if peer_uid(sock) != os.geteuid():
            writer.close()
            return
        await handle_connection(reader, writer)

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(checked, path=path)
    finally:
        os.umask(old_umask)
    return server, path


# --- the SQL session's side (blocking) -------------------------------------

class ControlClient:
    """A blocking connection to the worker, used inside SQL functions.

    While it waits it calls ``check_interrupts`` every ``slice_s`` seconds,
    so that pg_cancel_backend and statement_timeout end the wait promptly.
    """

    def __init__(self, database_oid, database_name, check_interrupts=None, slice_s=0.1):
        self.database_oid = database_oid
        self.database_name = database_name
        self.check_interrupts = check_interrupts or (lambda: None)
        self.slice_s = slice_s
        self.sock = None
        self._next_id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def connect(self, timeout=2.0):
        path = socket_path(self.database_oid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (TimeoutError, FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise WorkerUnavailable(
                f'the worker for database "{self.database_name}" is not running',
                detail=f"no answer on its control socket {os.path.abspath(path)}: {e}",
                hint="Start it with SELECT peer.start_worker(); or set "
                     "shared_preload_libraries = 'aquapeer' and aquapeer.database = "
                     f"'{self.database_name}' and restart the server.") from None
        sock.setblocking(False)
        self.sock = sock

    def request(self, op, args=None, timeout=10.0):
        """Send one request and wait for its answer; raise AquapeerError on failure."""
        if self.sock is None:
            self.connect()
        self._next_id += 1
        request_id = self._next_id
        deadline = time.monotonic() + timeout
        self._send(encode_frame({"id": request_id, "op": op, "args": args or {}}), deadline)
        reply = decode_body(self._recv(frame_length(self._recv(_HEADER.size, deadline)), deadline))
        if reply.get("id") != request_id:
            raise AquapeerError("the worker answered out of turn on the control channel")
        if not reply.get("ok"):
            raise AquapeerError.from_dict(reply.get("error") or {})
        return reply.get("result")

    def notify(self, op, args=None):
        """Send a one-way message; best effort, never blocks for long."""
        if self.sock is None:
            self.connect(timeout=0.5)
        self._send(encode_frame({"id": 0, "op": op, "args": args or {}}), time.monotonic() + 0.5)

    def _wait(self, want_write, deadline):
        while True:
            self.check_interrupts()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(
                    f'the worker for database "{self.database_name}" did not answer in time')
            r, w, _ = select.select([] if want_write else [self.sock],
                                    [self.sock] if want_write else [], [],
                                    min(self.slice_s, remaining))
            if r or w:
                return

    def _send(self, data, deadline):
        view = memoryview(data)
        while view:
            self._wait(True, deadline)
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                continue
            except OSError as e:
                raise self._lost(e) from None

    def _recv(self, n, deadline):
        chunks, have = [], 0
        while have < n:
            self._wait(False, deadline)
            try:
                chunk = self.sock.recv(n - have)
            except BlockingIOError:
                continue
            except OSError as e:
                raise self._lost(e) from None
            if not chunk:
                raise self._lost("connection closed")
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def _lost(self, why):
        self.close()
        return WorkerUnavailable(
            f'lost the connection to the worker for database "{self.database_name}"',
            detail=str(why), hint="The worker may have stopped; see peer.worker_status() and the server log.")
