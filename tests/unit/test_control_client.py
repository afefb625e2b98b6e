"""The control channel's framing and client, without a server."""

import os
import socket
import threading

import msgpack
import pytest

from aquapeer import control
from aquapeer.errors import AquapeerError, RequestTimeout, WorkerUnavailable


def test_frame_round_trip():
    message = {"id": 7, "op": "ping", "args": {"blob": b"\x00\xff", "text": "é"}}
    frame = control.encode_frame(message)
    assert control.frame_length(frame[:4]) == len(frame) - 4
    assert control.decode_body(frame[4:]) == message


def test_oversized_frame_is_refused_before_reading_it():
    with pytest.raises(AquapeerError, match="exceeds"):
        control.frame_length((control.MAX_FRAME + 1).to_bytes(4, "big"))


def test_a_frame_that_is_not_a_map_is_refused():
    with pytest.raises(AquapeerError, match="not a map"):
        control.decode_body(msgpack.packb([1, 2, 3]))


def test_socket_path_is_relative_and_short():
    path = control.socket_path(4294967295)
    assert not os.path.isabs(path)
    assert len(path) < 107


def _serve_once(listener, reply):
    conn, _ = listener.accept()
    with conn:
        header = conn.recv(4)
        body = conn.recv(control.frame_length(header))
        request = control.decode_body(body)
        if reply is not None:
            conn.sendall(control.encode_frame(reply(request)))
        else:
            threading.Event().wait(2)


@pytest.fixture
def listener(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir(control.SOCKET_DIR)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(control.socket_path(1))
    sock.listen(1)
    yield sock
    sock.close()


def test_client_gets_the_answer(listener):
    def echo(request):
        return {"id": request["id"], "ok": True, "result": request["args"]}

    t = threading.Thread(target=_serve_once, args=(listener, echo))
    t.start()
    with control.ControlClient(1, "db") as client:
        assert client.request("echo", {"a": 1}) == {"a": 1}
    t.join()


def test_client_raises_the_workers_error(listener):
    t = threading.Thread(target=_serve_once, args=(listener, lambda r: {
        "id": r["id"], "ok": False, "error": {"message": "no", "sqlstate": "22012", "hint": "h"}}))
    t.start()
    with control.ControlClient(1, "db") as client, pytest.raises(AquapeerError) as info:
        client.request("x")
    assert (info.value.message, info.value.sqlstate, info.value.hint) == ("no", "22012", "h")
    t.join()


def test_client_checks_interrupts_while_waiting(listener):
    t = threading.Thread(target=_serve_once, args=(listener, None))
    t.start()
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt("cancelled")

    with control.ControlClient(1, "db", check_interrupts=check, slice_s=0.05) as client:
        with pytest.raises(KeyboardInterrupt):
            client.request("slow", timeout=10)
    assert len(calls) == 4
    t.join()


def test_client_times_out(listener):
    t = threading.Thread(target=_serve_once, args=(listener, None))
    t.start()
    with control.ControlClient(1, "db", slice_s=0.05) as client, pytest.raises(RequestTimeout):
        client.request("slow", timeout=0.3)
    t.join()


def test_no_worker_names_the_database_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with control.ControlClient(1, "appdb") as client, pytest.raises(WorkerUnavailable) as info:
        client.request("ping")
    assert '"appdb"' in info.value.message
    assert "peer.start_worker()" in info.value.hint
