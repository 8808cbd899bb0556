"""The role's variables agree across the places an operator reads them: defaults/main.yml
(every variable at its default), meta/argument_specs.yml (documented and type-checked when
the role starts) and the table in docs/deployment.md. No ansible run: the files are read.

A variable left out of argument_specs is neither documented by `ansible-doc` nor checked
when the role starts; one named in the docs table with another default misleads the
operator who reads only the table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLE = ROOT / "ansible" / "roles" / "pacs_edge"
# The docs table's rows: | `name` or `name` / `_suffix` or `a/b/c_rest` | defaults | what |
_ROW = re.compile(r"^\| `(pacs_edge_[^|]+?)` \| (.+?) \| ", re.MULTILINE)


def _defaults() -> dict[str, Any]:
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def _spec() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    return spec["argument_specs"]["main"]["options"]


def _table_names(cell: str) -> list[str]:
    """The full names a row stands for: `pacs_edge_dicom_host` / `_port` / `_tls_port`
    (a suffix follows pacs_edge_SECTION_) and pacs_edge_sync_cool/cold/archive_after_days
    (alternatives of one word, the rest shared)."""
    parts = [p.strip().strip("`") for p in cell.split("` / `")]
    first = parts[0]
    if "/" in first:
        words = first.split("/")
        head, _, alt = words[0].rpartition("_")
        last, _, tail = words[-1].partition("_")
        return [f"{head}_{a}_{tail}" for a in [alt, *words[1:-1], last]]
    section = "_".join(first.split("_")[:3])
    return [first, *(section + suffix for suffix in parts[1:])]


def _table() -> dict[str, str]:
    """{variable: the default the table gives} from docs/deployment.md."""
    found: dict[str, str] = {}
    for cell, defaults in _ROW.findall((ROOT / "docs" / "deployment.md").read_text()):
        values = [re.sub(r"\s*\(.*\)$", "", v.strip()).strip("`") for v in defaults.split(" / ")]
        names = _table_names(cell)
        assert len(values) == len(names), (cell, defaults)
        found.update(zip(names, values, strict=True))
    return found


def test_every_default_is_in_the_argument_spec_with_the_same_default() -> None:
    defaults, spec = _defaults(), _spec()
    assert sorted(set(defaults) ^ set(spec)) == []
    differ = {name: (option.get("default"), defaults[name]) for name, option in spec.items()
              if not option.get("required") and option.get("default") != defaults[name]}
    assert differ == {}


def test_every_role_variable_the_tasks_and_templates_read_is_in_the_argument_spec() -> None:
    read: set[str] = set()
    for path in [*ROLE.glob("tasks/*.yml"), *ROLE.glob("templates/*.j2"),
                 *ROLE.glob("handlers/*.yml"), *ROLE.glob("vars/*.yml")]:
        read |= set(re.findall(r"\bpacs_edge_[a-z0-9]+(?:_[a-z0-9]+)*\b", path.read_text()))
    registered = set(re.findall(r"^\s+(?:register|loop_var): (pacs_edge_\w+)$",
                                "\n".join(p.read_text() for p in ROLE.glob("tasks/*.yml")),
                                re.MULTILINE))
    # pacs_edge__*: the role's own derived names (vars/main.yml, set_fact), not inputs.
    inputs = {name for name in read - registered if not name.startswith("pacs_edge__")}
    assert sorted(inputs - set(_spec())) == []


def _as_shown(value: object) -> str:
    """A default as the table writes it: `""`, `[]`, `true`; others bare (`8443`, `EDGE`)."""
    if isinstance(value, bool) or value in ("", []):
        return json.dumps(value)
    return str(value)


def test_the_deployment_guide_table_names_role_variables_at_their_defaults() -> None:
    defaults, spec, table = _defaults(), _spec(), _table()
    assert "pacs_edge_sync_rehydrate_priority" in table  # the parser reads the whole table
    assert sorted(set(table) - set(spec)) == []
    differ = {name: (shown, defaults[name]) for name, shown in table.items()
              if not spec[name].get("required") and shown != _as_shown(defaults[name])}
    assert differ == {}
