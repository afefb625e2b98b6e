"""The ``aquapeer`` command-line interface.

Installed as ``/usr/local/bin/aquapeer`` by ``make install``: a launcher that
runs the interpreter PL/Python uses with the versioned payload directory first
on ``sys.path`` and calls :func:`main`.

Each subcommand is one ``_add_<name>(subparsers)`` function that registers its
parser and sets ``func`` to a callable taking the parsed arguments and a rich
console and returning the exit code. Add new subcommands to ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aquapeer import __version__

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _connect(dsn: str | None):
    """Open a psycopg 3 connection (autocommit; libpq env vars apply)."""
    import psycopg

    return psycopg.connect(dsn or "", autocommit=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _table(title: str, columns: list[str], rows: list[tuple]) -> Table:
    """One row: a vertical field/value table (fits a terminal); else columns."""
    if len(rows) == 1:
        table = Table(title=title, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for name, value in zip(columns, rows[0], strict=True):
            table.add_row(name, _cell(value))
        return table
    table = Table(title=title)
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    if not rows:
        table.caption = "no rows"
    return table


def _query_rows(dsn: str | None, query: str) -> tuple[list[str], list[tuple]]:
    with _connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query)
        columns = [col.name for col in cur.description or ()]
        return columns, cur.fetchall()


# --- status ------------------------------------------------------------------

def _cmd_status(args: argparse.Namespace, console: Console) -> int:
    import psycopg

    try:
        columns, rows = _query_rows(args.dbname, "select * from peer.worker_status()")
    except psycopg.Error as exc:
        Console(stderr=True).print(f"[bold red]aquapeer status:[/] {str(exc).strip()}")
        return EXIT_ERROR

    if args.json:
        console.print_json(
            json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str)
        )
        return EXIT_OK

    console.print(_table("aquapeer worker status", columns, rows))
    return EXIT_OK


def _add_status(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status",
        help="show the aquapeer background worker status of a database",
        description="Connect to a database with the aquapeer extension and show "
        "peer.worker_status().",
    )
    _add_dbname(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_status)


# --- signal ------------------------------------------------------------------

def _log_to_stderr(err: Console, level: str):
    """aquapeer's logging to stderr: rich on a terminal, else one plain line per record
    (a service manager's or a benchmark's log file). The caller removes the handler."""
    import logging

    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("aquapeer")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    return logger, handler


def _cmd_signal(args: argparse.Namespace, console: Console) -> int:
    import logging

    from aquapeer.net import signal_cluster, signaling

    err = Console(stderr=True)
    if (args.cert is None) != (args.key is None):
        err.print("[bold red]aquapeer signal:[/] give both --cert and --key (wss://), or neither (ws://)")
        return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        err.print(f"[bold red]aquapeer signal:[/] --port {args.port} is not a TCP port")
        return EXIT_USAGE
    logger, handler = _log_to_stderr(err, args.log_level)
    if args.log_level != "debug":  # websockets' own "server listening/closing" repeat ours
        logging.getLogger("aquapeer.signaling.ws").setLevel(logging.WARNING)
    default = signaling.Limits()
    accept_rate = default.accept_rate if args.accept_rate is None else args.accept_rate
    total_rate = default.rate_total if args.total_rate is None else args.total_rate
    for option, value in (("--accept-rate", accept_rate), ("--total-rate", total_rate)):
        if value <= 0:
            err.print(f"[bold red]aquapeer signal:[/] {option} {value:g}: give more than 0")
            return EXIT_USAGE
    limits = signaling.Limits(max_connections=args.max_connections, accept_rate=accept_rate,
                              accept_burst=accept_rate * default.accept_burst / default.accept_rate,
                              rate_total=total_rate, burst_total=total_rate * default.burst_total / default.rate_total)
    try:
        signaling.run_server(args.host, args.port, cert=args.cert, key=args.key, limits=limits,
                             redis_url=args.redis)
    except OSError as exc:  # the port is taken, the address is not ours, a PEM file is unusable
        err.print(f"[bold red]aquapeer signal:[/] {exc}")
        return EXIT_ERROR
    except signal_cluster.ClusterError as exc:  # Redis is not there, or the URL is wrong
        err.print(f"[bold red]aquapeer signal:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"hint: {escape(exc.hint)}", highlight=False, soft_wrap=True)
        return EXIT_ERROR
    finally:
        logger.removeHandler(handler)
    return EXIT_OK


def _add_signal(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "signal",
        help="run a signaling (rendezvous) server for aquapeer peers",
        description="Run a signaling server: peers register with their key and "
        "relay signed connection envelopes through it. It is not trusted with "
        "any data and keeps nothing on disk. Stops on Ctrl-C or SIGTERM.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765,
                   help="port to listen on (default: 8765)")
    p.add_argument("--cert", metavar="FILE", default=None,
                   help="PEM certificate (chain) file: serve wss:// (needs --key)")
    p.add_argument("--key", metavar="FILE", default=None,
                   help="PEM private key file for --cert")
    p.add_argument("--max-connections", type=int, default=10000, metavar="N",
                   help="most connections at once (default: 10000)")
    p.add_argument("--accept-rate", type=float, default=None, metavar="N",
                   help="new connections a second, with a burst of 4 seconds' worth "
                   "(default: signaling.Limits, 500)")
    p.add_argument("--total-rate", type=float, default=None, metavar="N",
                   help="envelopes a second through this server in all, with a burst of 2 seconds' "
                   "worth (default: signaling.Limits, 5000)")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="share registrations with the other instances using this Redis, "
                   "e.g. redis://127.0.0.1:6379/0, to run several behind a load balancer "
                   "(docs/signaling.md); default: run alone")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log level on stderr (default: info)")
    p.set_defaults(func=_cmd_signal)


# --- lightpeers ----------------------------------------------------------------

def _cmd_lightpeers(args: argparse.Namespace, console: Console) -> int:
    import asyncio
    import signal

    from aquapeer import identity
    from aquapeer.net import lightpeer

    err = Console(stderr=True)
    if args.count < 1:
        err.print(f"[bold red]aquapeer lightpeers:[/] --count {args.count}: give at least 1")
        return EXIT_USAGE
    if args.offer_after < 0:
        err.print(f"[bold red]aquapeer lightpeers:[/] --offer-after {args.offer_after:g}: give 0 or more")
        return EXIT_USAGE
    if not args.echo and (args.friend_invite is None or len(args.signal) != 1):
        err.print("[bold red]aquapeer lightpeers:[/] give --friend-invite and one --signal "
                  "(several --signal only with --echo)")
        return EXIT_USAGE
    try:
        if not args.echo:
            identity.parse_invite(args.friend_invite)
        for url in args.signal:
            identity.check_signal_url(url)
    except identity.IdentityError as exc:
        err.print(f"[bold red]aquapeer lightpeers:[/] {exc.message}")
        return EXIT_USAGE
    logger, handler = _log_to_stderr(err, args.log_level)

    nodes: list = []

    def dump() -> None:  # SIGUSR1: every light peer's link, one JSON line each
        for row in lightpeer.describe(nodes):
            print(json.dumps(row), file=sys.stderr, flush=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        if args.echo:
            peers = lightpeer.run_echo_peers(args.count, args.signal, ready_file=args.invites_out)
        else:
            peers = lightpeer.run_light_peers(
                args.count, args.signal[0], args.friend_invite,
                host_addresses=tuple(args.host_address or ["127.0.0.1"]), ready_file=args.invites_out,
                offer_after=args.offer_after,
                started=lambda started, _invites: nodes.extend(started))
        task = asyncio.ensure_future(peers)
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
        for signum in handled[:2]:
            loop.add_signal_handler(signum, task.cancel)
        loop.add_signal_handler(signal.SIGUSR1, dump)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)

    try:
        asyncio.run(run())
    except OSError as exc:
        err.print(f"[bold red]aquapeer lightpeers:[/] {exc}")
        return EXIT_ERROR
    finally:
        logger.removeHandler(handler)
    return EXIT_OK


def _add_lightpeers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lightpeers",
        help="run many light peers (outside PostgreSQL) that befriend one database",
        description="Run COUNT light peers in one process, each with its own identity, "
        "all with the database of --friend-invite as their auto-connect friend. Their "
        "invites (light0, light1, ...) go to --invites-out as a JSON list once they are "
        "started: add them with peer.add_friend() and they connect by themselves. For "
        "tests and benchmarks. SIGUSR1 prints each light peer's link state as JSON "
        "lines on stderr. Stops on Ctrl-C or SIGTERM. With --echo, they are only "
        "registrations (round robin over the --signal servers) that send every envelope "
        "back to its sender, for bench/signaling.py; --invites-out then gets their peer ids.",
    )
    p.add_argument("--count", type=int, default=50, metavar="N",
                   help="how many light peers (default: 50)")
    p.add_argument("--signal", required=True, action="append", metavar="URL",
                   help="signaling server URL, e.g. ws://127.0.0.1:8765 (repeatable with --echo)")
    p.add_argument("--friend-invite", metavar="INVITE",
                   help="the database's invite, from select peer.invite() (not with --echo)")
    p.add_argument("--echo", action="store_true",
                   help="echo peers: registrations that send envelopes back, no database friend")
    p.add_argument("--invites-out", metavar="FILE", default=None,
                   help="write the light peers' invites here as a JSON list")
    p.add_argument("--offer-after", type=float, default=0.0, metavar="SECONDS",
                   help="make no offers of their own for this long after the invites are "
                   "written (they answer the database's); default 0: offer at once")
    p.add_argument("--host-address", action="append", metavar="ADDR",
                   help="ICE host candidate address (repeatable; default: 127.0.0.1)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="log level on stderr (default: info)")
    p.set_defaults(func=_cmd_lightpeers)


# --- pull --------------------------------------------------------------------

PULL_PROGRESS = ("select rows_done, rows_total, bytes_done, state from peer.transfer "
                 "where friend = %s and bundle = %s and started_at >= %s order by started_at desc limit 1")


def _cmd_pull(args: argparse.Namespace, console: Console) -> int:
    """peer.pull_bundle in one session while another shows peer.transfers as a progress bar."""
    import threading

    import psycopg
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    outcome: dict[str, Any] = {}
    try:
        puller, watcher = _connect(args.dbname), _connect(args.dbname)
    except psycopg.Error as exc:
        err.print(f"[bold red]aquapeer pull:[/] {str(exc).strip()}")
        return EXIT_ERROR
    started = watcher.execute("select now()").fetchone()[0]

    def run() -> None:
        try:
            outcome["summary"] = puller.execute(
                "select peer.pull_bundle(%s, %s, checkout => %s)",
                (args.friend, args.bundle, not args.no_checkout)).fetchone()[0]
        except psycopg.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    columns = (TextColumn(f"pulling {args.bundle} from {args.friend}"), BarColumn(),
               TextColumn("{task.completed:,.0f}/{task.fields[total_text]} rows"), DownloadColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("pull", total=None, total_text="?")
            while thread.is_alive():
                thread.join(0.25)
                row = watcher.execute(PULL_PROGRESS, (args.friend, args.bundle, started)).fetchone()
                if row:
                    progress.update(task, completed=row[0], total=row[1] or None,
                                    total_text=f"{row[1]:,}" if row[1] else "?")
    except KeyboardInterrupt:
        puller.cancel_safe()
        thread.join()
    finally:
        watcher.close()
    puller.close()
    if "error" in outcome:
        err.print(f"[bold red]aquapeer pull:[/] {str(outcome['error']).strip()}")
        return EXIT_ERROR
    summary = outcome["summary"]
    if args.json:
        console.print_json(json.dumps(summary))
    else:
        console.print(_table(f"pulled {args.bundle} from {args.friend}", list(summary), [tuple(summary.values())]))
    return EXIT_OK


def _add_pull(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pull",
        help="pull a bundle from a friend, with a progress bar",
        description="Run peer.pull_bundle(FRIEND, BUNDLE) in a database and show the transfer's "
        "progress (peer.transfers) while it runs.",
    )
    _add_dbname(p)
    p.add_argument("friend", help="the friend to pull from")
    p.add_argument("bundle", help="the bundle's name")
    p.add_argument("--no-checkout", action="store_true",
                   help="only fetch: leave the bundle's head and tables as they are")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_pull)


# --- export / import -----------------------------------------------------------

IMPORT_BATCH_LINES = 5000
IMPORT_BATCH_BYTES = 4 << 20


def _progress(err: Console, description: str, total: int | None):
    """A progress bar on stderr, only when stderr is a terminal; completed counts bytes."""
    from rich.progress import BarColumn, FileSizeColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.fields[documents]} documents"), FileSizeColumn(),
                        TimeElapsedColumn(), console=err, disable=not err.is_terminal)
    return progress, progress.add_task(description, total=total, documents=0)


def _sql_error(err: Console, command: str, exc: Exception, context: str = "") -> int:
    """The server's message and hint, without a traceback."""
    diag = getattr(exc, "diag", None)
    message = getattr(diag, "message_primary", None) or str(exc).strip()
    err.print(f"[bold red]aquapeer {command}:[/] {escape(message)}{escape(context)}", highlight=False,
              soft_wrap=True)
    if getattr(diag, "message_hint", None):
        err.print(f"hint: {escape(diag.message_hint)}", highlight=False, soft_wrap=True)
    return EXIT_ERROR


def _cmd_export(args: argparse.Namespace, console: Console) -> int:
    import os

    import psycopg

    err = Console(stderr=True)
    to_stdout = args.file in (None, "-")
    counts = {"bundle": 0, "object": 0, "commit": 0}
    written, head = 0, None
    try:
        out = sys.stdout if to_stdout else open(args.file, "w", encoding="utf-8")
    except OSError as exc:
        err.print(f"[bold red]aquapeer export:[/] {exc}")
        return EXIT_ERROR
    progress, task = _progress(err, f"exporting {args.bundle}", None)
    try:
        with _connect(args.dbname) as conn, conn.transaction(), progress:
            # A server-side cursor over bundle.export called in the select list: read in
            # chunks as the server produces them, never the whole bundle at once.
            with conn.cursor(name="aquapeer_export") as cur:
                cur.itersize = 1000
                cur.execute("select d->>'type', d::text from (select bundle.export(%s) as d) e", [args.bundle])
                for kind, line in cur:
                    if kind == "bundle":
                        head = json.loads(line)["head"]
                    out.write(line + "\n")
                    counts[kind] += 1
                    written += len(line.encode()) + 1
                    progress.update(task, completed=written, documents=sum(counts.values()))
        out.flush()
    except (psycopg.Error, OSError) as exc:
        if not to_stdout:  # half a bundle would only fail to import later
            out.close()
            os.unlink(args.file)
        if isinstance(exc, psycopg.Error):
            return _sql_error(err, "export", exc)
        err.print(f"[bold red]aquapeer export:[/] {escape(str(exc))}")
        return EXIT_ERROR
    if not to_stdout:
        out.close()
    # The summary goes to standard output unless that carries the bundle.
    (err if to_stdout else console).print(
        f"exported bundle {args.bundle}: {counts['object']} objects and {counts['commit']} commits, "
        f"{written} bytes, head {head or 'none'}" + ("" if to_stdout else f", to {args.file}"),
        highlight=False, soft_wrap=True, markup=False)
    return EXIT_OK


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a bundle (its commits and objects) to a file",
        description="Write bundle.export(BUNDLE) to FILE, one JSON document per line "
        "(docs/bundles.md, \"Export format\"): the header, every object, every commit. "
        "Read it back with `aquapeer import`.",
    )
    _add_dbname(p)
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle's name")
    p.add_argument("file", metavar="FILE", nargs="?", default=None,
                   help="where to write (default, or -: standard output)")
    p.set_defaults(func=_cmd_export)


def _batches(lines):
    """(first line number, [line, ...]) in batches of a bounded number of lines and bytes."""
    batch, size, first = [], 0, 1
    for number, line in enumerate(lines, 1):
        if not batch:
            first = number
        batch.append(line)
        size += len(line)
        if len(batch) >= IMPORT_BATCH_LINES or size >= IMPORT_BATCH_BYTES:
            yield first, batch
            batch, size = [], 0
    if batch:
        yield first, batch


def _cmd_import(args: argparse.Namespace, console: Console) -> int:
    import os

    import psycopg

    err = Console(stderr=True)
    counts = {"bundle": 0, "object": 0, "commit": 0}
    new = known = done = 0
    name = None
    try:
        src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as exc:
        err.print(f"[bold red]aquapeer import:[/] {exc}")
        return EXIT_ERROR
    total = None if args.file == "-" else os.fstat(src.fileno()).st_size
    progress, task = _progress(err, f"importing {args.file}", total)
    first = last = 0
    try:
        with _connect(args.dbname) as conn, progress:
            conn.add_notice_handler(lambda d: err.print(f"NOTICE: {d.message_primary}", highlight=False,
                                                        soft_wrap=True, markup=False))
            # One transaction: an import that fails leaves nothing behind.
            with conn.transaction():
                for first, batch in _batches(src):
                    last = first + len(batch) - 1
                    texts = [line.decode("utf-8") for line in batch if line.strip()]
                    for kind, outcome in conn.execute(
                            "select type, outcome from bundle.import_batch(%s::jsonb[])", [texts]):
                        counts[kind] += 1
                        new, known = new + (outcome == "new"), known + (outcome == "known")
                    if name is None and texts:
                        name = json.loads(texts[0]).get("name")
                    done += sum(len(line) for line in batch)
                    progress.update(task, completed=done, documents=sum(counts.values()))
            head = conn.execute("select head from bundle.bundle where name = %s", [name]).fetchone()
    except psycopg.Error as exc:
        where = f" (in lines {first}-{last})" if last else ""
        return _sql_error(err, "import", exc, f"{where}; nothing was imported")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        err.print(f"[bold red]aquapeer import:[/] {escape(str(exc))}; nothing was imported")
        return EXIT_ERROR
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    console.print(f"imported bundle {name}: {counts['object']} objects and {counts['commit']} commits "
                  f"({new} documents new, {known} already here), head {head[0] if head and head[0] else 'none'}",
                  highlight=False, soft_wrap=True, markup=False)
    return EXIT_OK


def _add_import(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="load a bundle written by `aquapeer export`",
        description="Load FILE (one JSON document per line, from `aquapeer export` or "
        "bundle.export) with bundle.import, in one transaction: all of it or, on an error, "
        "nothing. A bundle new here gets the exported head; an existing bundle keeps its "
        "head. The tables are not touched: bundle.checkout applies the head to them.",
    )
    _add_dbname(p)
    p.add_argument("file", metavar="FILE", help="the file to read (-: standard input)")
    p.set_defaults(func=_cmd_import)


# --- parser ------------------------------------------------------------------

def _add_dbname(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-d",
        "--dbname",
        metavar="DSN",
        default=None,
        help="libpq connection string or URI, or a database name "
        "(default: libpq environment, e.g. PGDATABASE, PGHOST)",
    )


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_status,
    _add_signal,
    _add_lightpeers,
    _add_pull,
    _add_export,
    _add_import,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aquapeer",
        description="aquapeer: PostgreSQL databases talking peer to peer over "
        "WebRTC data channels.",
    )
    parser.add_argument(
        "--version", action="version", version=f"aquapeer {__version__}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    console = Console()
    try:
        return int(args.func(args, console) or EXIT_OK)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
