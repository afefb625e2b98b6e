"""What the Docker image runs, run here (docs/docker.md): no Docker engine needed.

scripts/docker-build (the Dockerfile's RUN) against this machine's PostgreSQL 15,
scripts/docker-init.sh (the image's /docker-entrypoint-initdb.d script) against a
fresh cluster with the environment docker-compose.yml gives a peer, and the
Dockerfile and docker-compose.yml checked against the files and variables they name.
"""

import re
import shlex
import subprocess
import time
from urllib.parse import urlsplit

import psycopg
import pytest

import testbed as tb

REPO = tb.REPO_ROOT
INIT_SCRIPT = REPO / "scripts" / "docker-init.sh"
# What docker-compose.yml sets for the peer alice (test_compose_file_... checks they agree).
PEER_ENV = {
    "POSTGRES_PASSWORD": "change-me",
    "AQUAPEER_DATABASE": "app",
    "AQUAPEER_SIGNAL_URL": "ws://signal:8765",
    "AQUAPEER_TURN_URL": "turn:coturn:3478",
    "AQUAPEER_TURN_USERNAME": "aquapeer",
    "AQUAPEER_TURN_CREDENTIAL": "change-me-too",
    "AQUAPEER_DISPLAY_NAME": "alice",
}


def run(argv, env=None, timeout=600):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=tb.outside_env(**(env or {})), stdin=subprocess.DEVNULL)


def init(cluster, env):
    """The init script as the image's entrypoint runs it: against the server's socket."""
    return run(["sh", INIT_SCRIPT], env={"PGHOST": cluster.sock_dir, "PGPORT": str(cluster.port),
                                         "POSTGRES_USER": "postgres", **env}, timeout=120)


def test_the_build_script_is_idempotent_and_quick_once_installed():
    first = run([REPO / "scripts" / "docker-build"])
    assert first.returncode == 0, first.stdout + first.stderr
    started = time.monotonic()
    second = run([REPO / "scripts" / "docker-build"])
    took = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    assert "is installed already, as this tree has it" in second.stdout
    assert took < 10, f"a second scripts/docker-build took {took:.1f} s"


def test_the_build_script_refuses_an_unknown_option():
    out = run([REPO / "scripts" / "docker-build", "--clean"])
    assert out.returncode == 2
    assert "unknown argument '--clean' (the only option is --image)" in out.stderr


def test_the_init_script_sets_up_a_fresh_cluster_as_compose_configures_a_peer(cluster):
    signal = tb.SignalServer().start()
    try:
        # The compose network's names mean nothing here: loopback in their place.
        env = {**PEER_ENV, "AQUAPEER_SIGNAL_URL": signal.url, "AQUAPEER_TURN_URL": "turn:127.0.0.1:3478"}
        out = init(cluster, env)
        assert out.returncode == 0, out.stdout + out.stderr
        db = env["AQUAPEER_DATABASE"]
        peer_id = cluster.scalar("select peer.whoami()", dbname=db)
        assert f"extension aquapeer created in database {db}, peer {peer_id}" in out.stdout
        # the entrypoint stops its temporary server and starts the real one
        cluster.restart()
        assert cluster.scalar("show aquapeer.database") == db
        tb.wait_for(lambda: cluster.scalar("select peer.ping_worker() is not null", dbname=db), 20,
                    message="the worker of the init script's database to answer", ignore=(psycopg.Error,))
        assert cluster.sql("select url from peer.signal_server", dbname=db) == [(signal.url,)]
        assert cluster.sql("select url, username, credential from peer.turn_server", dbname=db) == \
            [("turn:127.0.0.1:3478", "aquapeer", "change-me-too")]
        assert cluster.scalar("select display_name from peer.config", dbname=db) == "alice"
        assert cluster.scalar("select problem from peer.worker_status()", dbname=db) is None
    finally:
        signal.stop()


@pytest.mark.parametrize(("env", "message"), [
    ({"AQUAPEER_SIGNAL_URL": "http://signal:8765"},
     "AQUAPEER_SIGNAL_URL must be ws://host:port or wss://host:port, not 'http://signal:8765'"),
    ({"AQUAPEER_STUN_URL": "stun.example:3478"},
     "AQUAPEER_STUN_URL must be stun:host:port or stuns:host:port, not 'stun.example:3478'"),
    ({"AQUAPEER_TURN_URL": "coturn:3478"},
     "AQUAPEER_TURN_URL must be turn:host:port or turns:host:port, not 'coturn:3478'"),
    ({"AQUAPEER_TURN_CREDENTIAL": ""},
     "set both AQUAPEER_TURN_USERNAME and AQUAPEER_TURN_CREDENTIAL, or neither"),
    ({"AQUAPEER_TURN_URL": ""},
     "AQUAPEER_TURN_USERNAME is set but AQUAPEER_TURN_URL is not: set the TURN server's URL too"),
], ids=["signal", "stun", "turn", "turn-credential", "turn-url"])
def test_the_init_script_names_the_variable_to_fix(env, message):
    # refused before it connects anywhere (no server listens at this socket)
    out = run(["sh", INIT_SCRIPT], env={**PEER_ENV, **env, "PGHOST": "/nonexistent"})
    assert out.returncode == 1
    assert out.stderr.strip() == f"aquapeer init: {message}"


def test_the_init_script_leaves_create_extension_to_you_without_a_database():
    out = run(["sh", INIT_SCRIPT], env={"PGHOST": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    assert "AQUAPEER_DATABASE is not set: the library is preloaded, CREATE EXTENSION is left to you" in out.stdout


def dockerfile_instructions():
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_dockerfile_runs_the_build_script_and_installs_the_init_script():
    instructions = dockerfile_instructions()
    copies = [shlex.split(args) for op, args in instructions if op == "COPY"]
    for *sources, _ in copies:
        for source in sources:
            assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    assert ["scripts/docker-init.sh", "/docker-entrypoint-initdb.d/50-aquapeer.sh"] in copies
    assert ["RUN", "scripts/docker-build --image"] in instructions
    # every file the build reads is in the image's context
    copied = {source.rstrip("/") for *sources, _ in copies for source in sources}
    needed = {"Makefile", "aquapeer.control", "META.json", "releases.txt", "src", "sql", "python", "scripts"}
    assert needed <= copied, needed - copied


def test_compose_file_builds_from_this_tree_and_gives_the_peers_what_the_init_script_reads():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not in tests/requirements.lock")
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"signal", "coturn", "alice", "bob"}
    for name, service in services.items():
        if "build" in service:
            assert (REPO / service["build"] / "Dockerfile").exists(), name
        else:
            assert service["image"].startswith("coturn/coturn:"), name
    read = set(re.findall(r"\$\{(AQUAPEER_[A-Z_]+)-\}", INIT_SCRIPT.read_text()))
    signal_command = services["signal"]["command"]
    assert signal_command[:2] == ["aquapeer", "signal"]
    signal_port = signal_command[signal_command.index("--port") + 1]
    coturn = services["coturn"]["command"]
    for peer in ("alice", "bob"):
        env = services[peer]["environment"]
        given = {k for k in env if k.startswith("AQUAPEER_")}
        assert given <= read, f"{peer} sets {given - read}, which scripts/docker-init.sh does not read"
        assert env == {**PEER_ENV, "AQUAPEER_DISPLAY_NAME": peer}
        signal_url = urlsplit(env["AQUAPEER_SIGNAL_URL"])
        assert (signal_url.hostname, str(signal_url.port)) == ("signal", signal_port)
        assert env["AQUAPEER_TURN_URL"] == f"turn:coturn:{_option(coturn, '--listening-port')}"
        assert _option(coturn, "--user") == f"{env['AQUAPEER_TURN_USERNAME']}:{env['AQUAPEER_TURN_CREDENTIAL']}"
        assert env["AQUAPEER_DATABASE"] in services[peer]["healthcheck"]["test"]


def _option(command, name):
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(name + "="))
