"""The package's layers, read from the sources with ast (nothing is imported): pure modules and
the network layer never reach the database, and only the bridge and the adapter import plpy."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "aquapeer"

# Modules that must never reach the database, directly or through the aquapeer modules they import.
PURE = {
    "aquapeer.errors": "the exceptions every layer raises",
    "aquapeer.identity": "keys, peer ids, signatures and invites: bytes in, bytes out",
    "aquapeer.bundles.commits": "the commit format, its ids and signatures",
    "aquapeer.bundles.merge": "the three-way merge of rows, on dicts",
    "aquapeer.bundles.rowtext": "a row's canonical text, the reference of the C row codec",
    "aquapeer.bundles.bucket": "a bucket of format 2, the reference of the C bucket codec",
    "aquapeer.net.wire": "the data channel's frame format",
    "aquapeer.live.text": "a text column's value as Y.Text edits, and friends' edits merged",
}
# The network layer runs outside PostgreSQL too (the signaling server, light peers).
OUTSIDE_THE_DATABASE = "aquapeer.net"

# What reaching the database means: the adapter, or a driver under it.
DATABASE_MODULES = {"aquapeer.db"}
DATABASE_DRIVERS = {"plpy", "psycopg"}

# The only modules that import plpy themselves.
PLPY_ALLOWED = {
    "aquapeer.sqlapi": "the bridge the SQL functions call",
    "aquapeer.db": "the adapter that wraps plpy inside the server",
}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _packages_of(name):
    """A module's enclosing packages, which importing it runs first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _resolve(name, node):
    """The absolute module an ImportFrom names (relative imports resolved against name)."""
    if not node.level:
        return node.module
    package = name.split(".")
    if SOURCES[name].name != "__init__.py":
        package.pop()
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name):
    """(aquapeer modules, other top-level modules) that a module imports anywhere in its source,
    function-local imports included."""
    ours, others = set(), set()

    def add(target):
        if target in SOURCES:
            ours.add(target)
            ours.update(_packages_of(target))
        elif target.split(".")[0] == "aquapeer":
            raise AssertionError(f"{name} imports {target}, which has no source")
        else:
            others.add(target.split(".")[0])

    for node in ast.walk(ast.parse(SOURCES[name].read_text(), str(SOURCES[name]))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node)
            for alias in node.names:
                # from package import module, or from module import name
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base)
    ours.discard(name)
    return ours, others


def reached(name):
    """Every aquapeer module that importing name runs, with the path that gets there."""
    paths = {name: [name]}
    todo = [name, *_packages_of(name)]
    for package in todo[1:]:
        paths[package] = [name, package]
    while todo:
        current = todo.pop()
        for target in imports(current)[0]:
            if target not in paths:
                paths[target] = [*paths[current], target]
                todo.append(target)
    return paths


DATABASE_FREE = sorted(set(PURE) | {m for m in SOURCES if m.startswith(OUTSIDE_THE_DATABASE + ".")})


def test_the_lists_name_modules_that_exist():
    assert set(PURE) <= set(SOURCES)
    assert set(PLPY_ALLOWED) <= set(SOURCES)
    assert len(DATABASE_FREE) > len(PURE)


def test_the_graph_sees_imports_through_relative_and_nested_packages():
    node = reached("aquapeer.net.node")
    assert {"aquapeer.net.transport", "aquapeer.net.wire", "aquapeer.identity", "aquapeer.errors",
            "aquapeer.friends", "aquapeer"} <= set(node)
    assert "aquapeer.db" in reached("aquapeer.sqlapi")
    assert "plpy" in imports("aquapeer.sqlapi")[1]
    assert "psycopg" in imports("aquapeer.db")[1]  # a function-local import counts


@pytest.mark.parametrize("name", DATABASE_FREE)
def test_never_reaches_the_database(name):
    paths = reached(name)
    for module, path in paths.items():
        assert module not in DATABASE_MODULES, f"{name} imports the database adapter: {' -> '.join(path)}"
        drivers = imports(module)[1] & DATABASE_DRIVERS
        assert not drivers, f"{name} reaches {', '.join(sorted(drivers))}: {' -> '.join(path)}"


def test_only_the_bridge_and_the_adapter_import_plpy():
    importers = {name for name in SOURCES if "plpy" in imports(name)[1]}
    assert importers <= set(PLPY_ALLOWED), f"plpy imported by {sorted(importers - set(PLPY_ALLOWED))}"
