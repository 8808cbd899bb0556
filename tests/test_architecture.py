"""The layout keeps its floors: imports only point down, and nothing imports in a circle.

Floors, lowest first (docs/architecture.md draws them):

    0 base          appliance.base, the appliance package itself (its version)
    1 provisioning  provisioning
    2 store         appliance.store, sync.blobstore, sync.pack
    3 services      appliance.services, appliance.audit, the rest of sync
    4 edges         appliance.dimse, appliance.dropfolder, appliance.hl7, appliance.http
    5 composition   appliance.process, appliance.cli

A module may import its own floor and the floors below. Two more rules keep
the processes apart: only the command line (the composition root) imports the
sync agent's package, so the serving process never loads cloud code or
credentials; and provisioning imports nothing of the appliance but its base.
Every import counts, including those inside functions (the CLI imports
lazily), except those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("appliance", "sync", "provisioning")
FLOORS: list[tuple[str, int]] = [  # most specific prefix first
    ("appliance.base", 0),
    ("appliance.store", 2),
    ("appliance.services", 3),
    ("appliance.audit", 3),
    ("appliance.dimse", 4),
    ("appliance.dropfolder", 4),
    ("appliance.hl7", 4),
    ("appliance.http", 4),
    ("appliance.process", 5),
    ("appliance.cli", 5),
    ("appliance", 0),
    ("provisioning", 1),
    ("sync.blobstore", 2),
    ("sync.pack", 2),
    ("sync", 3),
]
NAMES = {0: "base", 1: "provisioning", 2: "store", 3: "services", 4: "edges", 5: "composition"}


def floor(module: str) -> int:
    for prefix, level in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} is on no floor: add its package to FLOORS")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


KNOWN = modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
            and "TYPE_CHECKING" in ast.unparse(stmt.test) for node in ast.walk(stmt)}


def imports(path: Path, name: str, *, top_level_only: bool = False) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of a project module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: -node.level + (1 if path.name == "__init__.py"
                                                             else 0) or None]
                base = ".".join([*package, *([base] if base else [])])
            # `from package import module` depends on that module, not only the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in KNOWN else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield node.lineno, target


def test_every_import_points_down_or_sideways() -> None:
    upward = []
    for name, path in sorted(KNOWN.items()):
        for line, target in imports(path, name):
            if floor(target) > floor(name):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {name} ({NAMES[floor(name)]})"
                              f" imports {target} ({NAMES[floor(target)]})")
    assert not upward, "imports that point up a floor:\n" + "\n".join(upward)


def test_only_the_command_line_imports_the_sync_agent() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name} imports {target}"
                 for name, path in sorted(KNOWN.items())
                 if name.startswith("appliance") and not name.startswith("appliance.cli")
                 for line, target in imports(path, name) if target.split(".")[0] == "sync"]
    assert not offenders, "\n".join(offenders)


def test_provisioning_imports_only_the_base() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name} imports {target}"
                 for name, path in sorted(KNOWN.items()) if name.startswith("provisioning")
                 for line, target in imports(path, name)
                 if target.split(".")[0] != "provisioning" and floor(target) != 0]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle() -> None:
    """Imports inside functions count too: a lazy import is still a dependency."""
    known = KNOWN
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = set()
        for _, target in imports(path, name):
            while target and target not in known:  # `from pkg import name` of a non-module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # A package's __init__ importing its own submodules is not a cycle of concern.
    real = [c for c in cycles if not any(b.startswith(a + ".") for a, b in itertools.pairwise(c))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_no_two_modules_share_a_name() -> None:
    seen: dict[str, list[str]] = {}
    for name, path in KNOWN.items():
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.name, []).append(name)
    shared = {file: names for file, names in seen.items() if len(names) > 1}
    assert not shared, shared


SQL_CALLS = {"execute", "executemany", "executescript", "fetchall", "fetchone", "fetchmany"}
SQL_TEXT = re.compile(
    r"\s*\(?\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|PRAGMA|WITH)\s")
SQL_FREE = ("appliance", "sync")  # packages whose SQL lives in appliance/store/ alone
# The one module that may touch aiosqlite's internals (its patch, checked by test_compat).
SQL_EXEMPT = ("appliance.base.compat",)


def sql_uses(path: Path) -> Iterator[tuple[int, str]]:
    """(line, what) for every call of a cursor method, import of an SQLite driver or string
    that reads as an SQL statement in `path` (a driver imported for type hints only, under
    `if TYPE_CHECKING:`, does not count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_CALLS):
            yield node.lineno, f".{node.func.attr}()"
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            yield from ((node.lineno, f"import {n}") for n in names
                        if n.split(".")[0] in ("sqlite3", "aiosqlite"))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and SQL_TEXT.match(node.value)):
            yield node.lineno, "SQL text"


def test_only_the_store_holds_sql() -> None:
    """Services, edges and commands call named store operations that return typed values;
    the schema has one owner."""
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}"
                 for name, path in sorted(KNOWN.items())
                 if name.split(".")[0] in SQL_FREE and not name.startswith("appliance.store")
                 and name not in SQL_EXEMPT
                 for line, what in sql_uses(path)]
    assert not offenders, "SQL outside appliance/store/:\n" + "\n".join(offenders)


def test_every_package_folder_is_a_regular_package() -> None:
    """A folder of modules without __init__.py is a namespace package: it imports from a
    checkout, but tools that look for packages (linters, type checkers, some packagers)
    skip it, and a stray folder of the same name elsewhere on the path merges into it."""
    folders = {path.parent for path in KNOWN.values()}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"package folders without __init__.py: {missing}"
