"""Which STUN and TURN rows a link uses, and how a server's failure reads (no server)."""

import asyncio

import aioice.stun
import pytest

from aquapeer.net import transport

BAD = ("turn:127.0.0.1:3478", "u", "wrong")
GOOD = ("turn:127.0.0.1:3478", "u", "right")  # a corrected credential: same URL, a second row
OTHER = ("turn:127.0.0.1:3479", "u", "right")


def test_attempt_n_uses_the_nth_rows():
    ice = transport.IceServers(["stun:a", "stun:b"], [BAD, GOOD, OTHER])
    assert ice.servers(0) == ("stun:a", BAD)
    assert ice.servers(1) == ("stun:b", GOOD)
    assert ice.servers(4) == ("stun:a", GOOD)
    assert transport.IceServers().servers(3) == (None, None)


def test_a_failed_row_is_passed_over_not_its_url():
    ice = transport.IceServers(["stun:a", "stun:b"], [BAD, GOOD, OTHER])
    ice.server_failed(BAD, "TURN server turn:127.0.0.1:3478 refused: 401 Unauthorized")
    ice.server_failed("stun:a", "STUN server stun:a did not answer within 2 s")
    assert ice.servers(0) == ("stun:b", GOOD)
    assert ice.passed_over(0) == ["STUN server stun:a did not answer within 2 s 0 s ago",
                                  "TURN server turn:127.0.0.1:3478 refused: 401 Unauthorized 0 s ago"]
    assert ice.passed_over(1) == []
    # A copy for a friend with its own STUN server shares what failed.
    copy = transport.IceServers(["stun:c"], ice.turn_servers, failed=ice.failed)
    assert copy.servers(0) == ("stun:c", GOOD)
    ice.server_worked(BAD)
    assert copy.servers(0) == ("stun:c", BAD)


def test_when_every_row_failed_turn_goes_round_and_stun_is_left_out(monkeypatch):
    ice = transport.IceServers(["stun:a"], [BAD, GOOD])
    for row in ("stun:a", BAD, GOOD):
        ice.server_failed(row, f"{row} failed")
    assert [ice.servers(n) for n in range(3)] == [(None, BAD), (None, GOOD), (None, BAD)]
    # ... and a failure is forgotten after a while: the preferred row is tried again.
    now = transport.time.monotonic()
    monkeypatch.setattr(transport.time, "monotonic", lambda: now + transport.FAILED_SERVER_SKIP_S)
    assert ice.servers(0) == ("stun:a", BAD)


def test_the_configuration_has_the_chosen_rows_only():
    ice = transport.IceServers(["stun:127.0.0.1:3478"], [BAD, OTHER], relay_only=True)
    ice.server_failed(BAD, "refused")
    config = ice.configuration(0)
    assert [(s.urls, s.username, s.credential) for s in config.iceServers] == [
        ("stun:127.0.0.1:3478", None, None), OTHER]
    assert config.iceTransportPolicy.value == "relay"
    assert transport.IceServers().configuration().iceServers == []  # never aiortc's default server


def _error(code, reason):
    message = aioice.stun.Message(aioice.stun.Method.ALLOCATE, aioice.stun.Class.ERROR)
    message.attributes["ERROR-CODE"] = (code, reason)
    return aioice.stun.TransactionFailed(message)


@pytest.mark.parametrize("exc, reason", [
    (_error(401, "Unauthorized"), "refused: 401 Unauthorized (wrong username or credential)"),
    (_error(486, "Allocation Quota Reached"), "refused: 486 Allocation Quota Reached"),
    (TimeoutError(), f"did not answer within {transport.SERVER_QUERY_TIMEOUT_S:g} s"),
    (aioice.stun.TransactionTimeout(), f"did not answer within {transport.SERVER_QUERY_TIMEOUT_S:g} s"),
    (ConnectionRefusedError(111, "Connection refused"), "could not be reached: Connection refused"),
    (ConnectionError("TURN allocation response is missing LIFETIME"),
     "failed: ConnectionError: TURN allocation response is missing LIFETIME"),
])
def test_failure_reasons(exc, reason):
    assert transport.server_failure_reason(exc) == reason


def test_a_query_is_bounded_and_its_failure_recorded(monkeypatch):
    monkeypatch.setattr(transport, "SERVER_QUERY_TIMEOUT_S", 0.05)

    async def main():
        failures = []
        transport._server_failures.set(failures)
        with pytest.raises(TimeoutError):
            await transport._bounded_query("stun", asyncio.sleep(10))
        with pytest.raises(aioice.stun.TransactionFailed):
            await asyncio.create_task(transport._bounded_query("turn", _raise(_error(401, "Unauthorized"))))
        assert await transport._bounded_query("turn", asyncio.sleep(0, "ok")) == "ok"
        return failures

    assert asyncio.run(main()) == [("stun", "did not answer within 0.05 s"),
                                   ("turn", "refused: 401 Unauthorized (wrong username or credential)")]


async def _raise(exc):
    raise exc
