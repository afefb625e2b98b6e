"""pytest fixtures: throwaway PostgreSQL 15 clusters (see tests/testbed.py).

Fixtures
    make_testbed(n=2, **kw) -> Testbed   factory, function scope; kw go to
                                         testbed.Testbed (names, extra_conf,
                                         preload, start, parallel, env)
    testbed   -> Testbed with alice and bob, started (function scope)
    cluster   -> one started Cluster, 'alice' (function scope)
    shared_cluster -> one started Cluster 'shared' for the whole session;
                 for cheap tests that neither kill, stop nor reconfigure the
                 server, and that drop whatever they create.

The ``testbed`` and ``cluster`` fixtures read ``@pytest.mark.testbed(...)``:
    @pytest.mark.testbed(n=3, extra_conf={"aquapeer.restart_interval": 1})
    def test_x(testbed): ...
    @pytest.mark.testbed(preload=False)
    def test_y(cluster): ...

Backends: local clusters by default; with AQUAPEER_TEST_DOCKER=1 the fixtures
build the repo's Dockerfile and run containers through testcontainers, and
skip (with the reason) when no Docker engine is reachable.

Teardown stops the servers, kills leftovers and removes every directory,
also when the test failed; when it failed, the tail of each server's log is
printed into the test's report ("Captured stdout teardown").
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testbed as tb  # noqa: E402

DOCKER = os.environ.get("AQUAPEER_TEST_DOCKER") == "1"
BACKEND = "docker" if DOCKER else "local"
LOG_TAIL_LINES = 60

_docker_error_cache: list = []


def docker_error() -> str | None:
    """Why no Docker engine is reachable (None if it is); asked once."""
    if not _docker_error_cache:
        _docker_error_cache.append(tb.docker_engine_error())
    return _docker_error_cache[0]


def _docker_or_skip() -> None:
    err = docker_error()
    if err:
        pytest.skip(f"AQUAPEER_TEST_DOCKER=1 but no Docker engine is reachable ({err}); "
                    "the docker-backed cases were skipped")


# --------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "docker: exercises the Docker/testcontainers backend "
        "(skipped with the reason when no Docker engine is reachable)")
    config.addinivalue_line(
        "markers", "testbed(n=2, names=None, extra_conf=None, preload=True, env=None): "
        "arguments for the testbed and cluster fixtures")
    if not DOCKER:
        # servers and dirs of earlier runs that were killed before cleaning up
        tb.reap_stale()


def pytest_report_header(config):
    if DOCKER:
        err = docker_error()
        engine = "reachable" if err is None else f"NOT reachable ({err})"
        return [f"aquapeer testbed: docker backend (AQUAPEER_TEST_DOCKER=1): containers of "
                f"the image built from {tb.REPO_ROOT / 'Dockerfile'}; Docker engine {engine}"]
    try:
        bindir = tb.pg_bindir()
        so = "yes" if tb.extension_installed() else \
            f"NO (not in {tb.pkglibdir()}: run `make install`)"
        user = tb.server_user()[0]
    except Exception as exc:  # pragma: no cover
        return [f"aquapeer testbed: local backend, PostgreSQL not usable: {exc}"]
    return [f"aquapeer testbed: local backend: throwaway clusters from {bindir}, "
            f"servers run as OS user {user}; aquapeer.so installed: {so} "
            f"(AQUAPEER_TEST_DOCKER=1 selects the docker backend)"]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _marker_kwargs(request) -> dict:
    m = request.node.get_closest_marker("testbed")
    if m is None:
        return {}
    kw = dict(m.kwargs)
    if m.args:
        kw.setdefault("n", m.args[0])
    return kw


def _test_failed(node) -> bool:
    return any(getattr(getattr(node, "rep_" + when, None), "failed", False)
               for when in ("setup", "call"))


def _dump_logs(beds) -> None:
    for bed in beds:
        for c in bed.clusters:
            try:
                lines = c.log().splitlines()[-LOG_TAIL_LINES:]
            except Exception as exc:
                lines = [f"(log unavailable: {exc})"]
            print(f"----- server log of {c.name} (last {LOG_TAIL_LINES} lines) -----")
            print("\n".join(lines))


def _close_all(beds) -> None:
    errors = []
    for bed in reversed(beds):
        try:
            bed.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def _new_testbed(n: int, kw: dict) -> tb.Testbed:
    kw = dict(kw)
    if DOCKER:
        _docker_or_skip()
        kw.setdefault("backend", "docker")
    bed = tb.Testbed(n, **kw)
    bed.__enter__()  # on failure it has already cleaned up after itself
    return bed


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def make_testbed(request):
    """Factory: ``bed = make_testbed(3, extra_conf={...})``; every bed made
    is destroyed at teardown."""
    beds: list[tb.Testbed] = []

    def make(n: int = 2, **kw) -> tb.Testbed:
        bed = _new_testbed(n, kw)
        beds.append(bed)
        return bed

    yield make
    if _test_failed(request.node):
        _dump_logs(beds)
    _close_all(beds)


@pytest.fixture
def testbed(make_testbed, request):
    """alice and bob, started (``@pytest.mark.testbed(...)`` changes that)."""
    kw = _marker_kwargs(request)
    n = kw.pop("n", 2)
    return make_testbed(n, **kw)


@pytest.fixture
def cluster(make_testbed, request):
    """One started cluster, alice (``@pytest.mark.testbed(...)`` applies)."""
    kw = _marker_kwargs(request)
    kw.pop("n", None)
    kw.setdefault("names", ["alice"])
    return make_testbed(1, **kw)[0]


@pytest.fixture(scope="session")
def shared_cluster():
    """One started cluster for the whole session.  Tests must not stop,
    kill or reconfigure it and must drop what they create."""
    bed = _new_testbed(1, {"names": ["shared"]})
    try:
        yield bed[0]
    finally:
        bed.close()


@pytest.fixture(scope="module")
def worker_cluster():
    """One cluster per test module with the extension created in postgres and
    its worker answering.  Tests may restart the worker, not the server."""
    bed = _new_testbed(1, {"names": ["worker"]})
    try:
        cluster = bed[0]
        cluster.sql("create extension aquapeer cascade")
        tb.wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null"), 20,
                    message="the worker to answer", ignore=(Exception,))
        yield cluster
    finally:
        bed.close()


@pytest.fixture(scope="module")
def module_signal_server():
    """One signaling server (``aquapeer signal`` on loopback) for a test module."""
    server = tb.SignalServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_testbed(request):
    """A test bed shared by the tests of a module, made from the module's
    ``MODULE_TESTBED`` dict (n, names, extra_conf, ...).  Its logs are
    printed after any test using it fails."""
    kw = dict(getattr(request.module, "MODULE_TESTBED", {}))
    bed = _new_testbed(kw.pop("n", 2), kw)
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture(autouse=True)
def _module_testbed_logs_on_failure(request):
    yield
    if "module_testbed" in request.fixturenames and _test_failed(request.node):
        _dump_logs([request.getfixturevalue("module_testbed")])
