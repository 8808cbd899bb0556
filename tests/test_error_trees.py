"""Each package draws every one of its error classes in one docstring tree, as they are.

A reader finds all errors of a package from one module: appliance/base/errors.py,
sync/__init__.py, provisioning/provisioning_errors.py. The trees are checked against
the classes themselves: every exception class defined in the package is drawn,
under its real base class, and nothing drawn is missing.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil
import re
from types import ModuleType

import pytest

from appliance.base.errors import PacsEdgeError

TREES = {
    "appliance": "appliance.base.errors",
    "sync": "sync",
    "provisioning": "provisioning.provisioning_errors",
}
_NODE = re.compile(r"^(?P<indent>(?:│   |    )*)(?P<glyph>├── |└── )?(?P<name>[A-Za-z_]\w*)")


def _modules(package: str) -> list[ModuleType]:
    root = importlib.import_module(package)
    names = [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.")
             if not info.name.endswith("__main__")]
    return [root, *(importlib.import_module(name) for name in names)]


def _exceptions(package: str) -> dict[str, type[BaseException]]:
    """Every exception class defined (not imported) in the package's modules."""
    found: dict[str, type[BaseException]] = {}
    for module in _modules(package):
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__):
                assert found.get(name, obj) is obj, f"two error classes named {name}"
                found[name] = obj
    return found


def _tree(module_name: str) -> dict[str, str | None]:
    """{class name: drawn parent name (None for a root)} from the docstring's Tree:: block."""
    doc = importlib.import_module(module_name).__doc__ or ""
    lines = doc.split("Tree::", 1)[1].splitlines()[1:]
    block = []
    for line in lines:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    drawn: dict[str, str | None] = {}
    path: list[str] = []
    for line in block:
        match = _NODE.match(line)
        if match is None or (match["indent"] and not match["glyph"]):
            continue  # blank, or a description continued on the next line
        depth = len(match["indent"]) // 4 + (1 if match["glyph"] else 0)
        if depth == 0 and line[0] == " ":
            continue
        del path[depth:]
        drawn[match["name"]] = path[-1] if path else None
        path.append(match["name"])
    return drawn


@pytest.mark.parametrize("package", sorted(TREES))
def test_every_error_class_of_a_package_is_drawn_under_its_base(package: str) -> None:
    classes = _exceptions(package)
    drawn = _tree(TREES[package])
    missing = sorted(set(classes) - set(drawn))
    assert not missing, f"{package}: not drawn in {TREES[package]}: {missing}"
    for name, cls in classes.items():
        base = cls.__bases__[0]
        # A root is a class derived from Exception itself (PacsEdgeError).
        expected = None if base is Exception else base.__name__
        assert drawn[name] == expected, (
            f"{package}: {name} is drawn under {drawn[name]}, derives from {base.__name__}")


@pytest.mark.parametrize("package", sorted(TREES))
def test_every_class_drawn_in_a_tree_exists(package: str) -> None:
    known = {name for pkg in TREES for name in _exceptions(pkg)}
    known |= {name for name, obj in vars(builtins).items()
              if inspect.isclass(obj) and issubclass(obj, BaseException)}
    stale = sorted(set(_tree(TREES[package])) - known)
    assert not stale, f"{TREES[package]} draws classes that do not exist: {stale}"


@pytest.mark.parametrize("package", ["sync", "provisioning"])
def test_every_error_of_the_other_packages_is_a_pacs_edge_error(package: str) -> None:
    """So the command line and the sync agent handle them with no adapter."""
    assert all(issubclass(cls, PacsEdgeError) for cls in _exceptions(package).values())
