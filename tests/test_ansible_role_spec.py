"""The role's variables agree across the places an operator reads them: defaults/main.yml
(every variable at its default), meta/argument_specs.yml (documented and type-checked when
the role starts) and the table in docs/deployment.md; and with pacs-edge's typed config
(appliance/base/config.py), which the role's template writes. No ansible run: the files
are read, and the template is rendered with Jinja and Ansible's own filters (the
converging run is tests/test_ansible*.py).

A variable left out of argument_specs is neither documented by `ansible-doc` nor checked
when the role starts; one named in the docs table with another default misleads the
operator who reads only the table. A config key the role has no route to leaves every
box of a fleet at its default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import jinja2
import yaml
from ansible.plugins.filter.core import to_bool, to_json

from appliance.base import config as pacs_config

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
    """A default as the table writes it: `""`, `["P"]`, `true`; others bare (`8443`, `EDGE`)."""
    if isinstance(value, bool | list) or value == "":
        return json.dumps(value)
    return str(value)


def test_the_deployment_guide_table_names_role_variables_at_their_defaults() -> None:
    defaults, spec, table = _defaults(), _spec(), _table()
    assert "pacs_edge_sync_rehydrate_priority" in table  # the parser reads the whole table
    assert sorted(set(table) - set(spec)) == []
    differ = {name: (shown, defaults[name]) for name, shown in table.items()
              if not spec[name].get("required") and shown != _as_shown(defaults[name])}
    assert differ == {}


def _setting_variables() -> dict[str, dict[str, str]]:
    """{section: {key: variable}}: the keys the role writes from a variable of its own."""
    return yaml.safe_load((ROLE / "vars" / "main.yml").read_text()).get(
        "pacs_edge__setting_variables", {})


def _config_fields() -> dict[tuple[str, str], tuple[dataclasses.Field[Any], Any]]:
    """{(section, key): (field, type)} of every key pacs-edge.toml may hold."""
    found = {}
    for section, cls in pacs_config._SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            found[section, field.name] = (field, hints[field.name])
    return found


def _template_lines() -> dict[tuple[str, str], str]:
    """{(section, key): the line's expression} of the template's own `key = {{ ... }}`."""
    found, section = {}, ""
    for line in (ROLE / "templates" / "pacs-edge.toml.j2").read_text().splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header[1]
        elif written := re.fullmatch(r"(\w+) = (\{\{.*\}\})", line):
            found[section, written[1]] = written[2]
    return found


def _render(variables: dict[str, Any]) -> str:
    """templates/pacs-edge.toml.j2 as the template module renders it (trim_blocks), with
    the role's defaults and static vars, the derived variables it reads, and `variables`."""
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined,
                             loader=jinja2.FileSystemLoader(ROLE / "templates"))
    env.filters.update(to_json=to_json, bool=to_bool)
    context = {**_defaults(), "pacs_edge__setting_variables": _setting_variables(),
               "ansible_managed": "Ansible managed", "inventory_hostname": "box",
               "pacs_edge__viewer_root": "", "pacs_edge__credentials_file": "", **variables}
    return env.get_template("pacs-edge.toml.j2").render(context)


def _toml_value(field: dataclasses.Field[Any]) -> Any:
    """A field's default as the inventory gives it (a list, a string); a path for None."""
    value = pacs_config._default(field)
    if isinstance(value, tuple):
        return [str(v) for v in value]
    return "x.pem" if value is None else str(value) if isinstance(value, Path) else value


def test_the_template_writes_exactly_the_keys_of_the_setting_variables() -> None:
    """pacs_edge__setting_variables (what pacs_edge_settings may not set, and which
    variable the preflight names instead) is the template's own lines, each a key pacs-edge
    knows, from a variable of the role."""
    named = {(section, key): variable for section, keys in _setting_variables().items()
             for key, variable in keys.items()}
    lines = _template_lines()
    assert sorted(set(named) ^ set(lines)) == []
    assert sorted(set(named) - set(_config_fields())) == []
    assert sorted(set(named.values()) - set(_defaults())) == []
    # A line reads its own variable, or one the role derives from it (pacs_edge__*).
    differ = {key: expression for key, expression in lines.items()
              if named[key] not in expression and "pacs_edge__" not in expression}
    assert differ == {}


def test_every_config_key_reaches_the_box_through_the_role(tmp_path: Path) -> None:
    """Every key of every [section] of pacs-edge.toml is written by the role: from its own
    variable or from pacs_edge_settings. Rendered with each other key at its default, the
    file holds every key pacs-edge knows, and pacs-edge loads it."""
    named = _setting_variables()
    fields = _config_fields()
    settings: dict[str, dict[str, Any]] = {}
    for (section, key), (field, _) in fields.items():
        if key not in named.get(section, {}):
            settings.setdefault(section, {})[key] = _toml_value(field)
    text = _render({"pacs_edge_settings": settings, "pacs_edge_dicom_workers": 2,
                    "pacs_edge__credentials_file": "creds"})
    raw = tomllib.loads(text)
    written = {(section, key) for section, keys in raw.items() for key in keys}
    assert sorted(set(fields) ^ written) == []
    pacs_config.config_from_mapping(tmp_path, raw)


_KINDS = {bool: {"bool"}, int: {"int"}, float: {"float"}, str: {"str"},
          Path: {"str", "path"}, Path | None: {"str", "path"},
          tuple[str, ...]: {"list"}, tuple[Path, ...]: {"list"}}


def test_each_setting_variable_has_the_type_of_its_config_key() -> None:
    """A variable of a float key is a float (argument_specs checks it when the role starts;
    the template writes it as one): `pacs_edge_sync_evict_after_days: 0.5` (12 hours) was
    refused as not an int, though pacs-edge takes it."""
    fields, spec = _config_fields(), _spec()
    # The line's input variable; none for a derived one (the viewer link, credentials file).
    read = {key: re.findall(r"\bpacs_edge_[a-z0-9]\w*", expression)
            for key, expression in _template_lines().items()}
    differ = {variable[0]: (spec[variable[0]]["type"], str(fields[key][1]))
              for key, variable in read.items()
              if variable and spec[variable[0]]["type"] not in _KINDS[fields[key][1]]}
    assert differ == {}


def test_a_non_integer_sync_setting_is_written_as_given(tmp_path: Path) -> None:
    config = pacs_config.config_from_mapping(tmp_path, tomllib.loads(_render(
        {"pacs_edge_settings": {}, "pacs_edge_sync_evict_after_days": 0.5,
         "pacs_edge_sync_disk_high_watermark_percent": 92.5})))
    assert (config.sync.evict_after_days, config.sync.disk_high_watermark_percent) == (0.5, 92.5)


def test_settings_values_are_written_as_toml_whatever_they_hold(tmp_path: Path) -> None:
    """Quotes, a backslash, a newline, DEL (which JSON leaves bare, and a TOML string may
    not hold) and a character beyond U+FFFF (which JSON's ASCII escapes write as two halves
    TOML refuses) come back from the file as they went in: no value ends its string early,
    adds a key, or makes the file no TOML."""
    site = 'St. "Mary\'s" \\ 𠮷田\nline two\x7f\t'
    text = _render({"pacs_edge_settings": {"audit": {"site_id": site},
                                          "prefetch": {"modalities": ["CT", 'M"R\\']}},
                    "pacs_edge_hl7_host": "𠮷.example"})
    raw = tomllib.loads(text)
    assert raw["audit"] == {"site_id": site}
    assert raw["prefetch"] == {"modalities": ["CT", 'M"R\\']}
    assert raw["hl7"]["host"] == "𠮷.example"


def test_the_deployment_guide_table_names_every_role_variable() -> None:
    """The operator who reads the table finds every variable of the role: those that
    write a key of pacs-edge.toml, pacs_edge_settings for the others, and those of the
    install, the certificates and Prometheus."""
    variables = {v for keys in _setting_variables().values() for v in keys.values()}
    assert variables <= set(_spec())
    assert sorted(set(_spec()) - set(_table())) == []
