"""The operator docs say what the code does: config keys and their defaults, and the
options of every `pacs-edge` command line they show.

The config's own reference is the commented file `init` writes (appliance/base/
config.py, every key at its default); the docs describe the keys in tables (`| key |
default | ...`, after a line naming the `[section]`) and in passing (`[sync]
scrub_fraction_per_day` (0.01)). An operator review found these checked by hand only:
a key renamed, a default changed or a command option respelled would leave the docs
wrong without a failing test.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import Any

import click

from appliance.base import config as config_module
from appliance.cli.root import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS: dict[str, type] = config_module._SECTIONS


def fields(section: str) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def key_tables() -> list[tuple[str, str, str, str]]:
    """(where, section, key, documented default) of every row of the docs' key tables."""
    rows = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not re.match(r"\|\s*key\s*\|\s*default\s*\|", line):
                continue
            named = [s for s in re.findall(r"\[(\w+)\]", " ".join(lines[max(0, i - 4):i]))
                     if s in SECTIONS]
            assert named, f"{path.relative_to(ROOT)}:{i + 1}: a key table names no [section]"
            for j in range(i + 2, len(lines)):
                if not lines[j].startswith("|"):
                    break
                key, default = (c.strip().strip("`") for c in lines[j].strip("|").split("|")[:2])
                rows.append((f"{path.relative_to(ROOT)}:{j + 1}", named[-1], key, default))
    return rows


UNITS = {"s": 1, "h": 1, "MB": 1, "MiB": 1 << 20, "KiB": 1 << 10, "": 1}


def documented_value(text: str) -> Any:
    """A default as the docs write it: JSON (`"auto"`, `["P"]`, `false`), or a number
    with a unit (`60 s`, `1 MiB`), or a bare word (`127.0.0.1`)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    number = re.fullmatch(r"([0-9][0-9,]*(?:\.[0-9]+)?)\s*([A-Za-z]*)", text)
    if number and number.group(2) in UNITS:
        return float(number.group(1).replace(",", "")) * UNITS[number.group(2)]
    return text


def code_value(field: dataclasses.Field[Any]) -> Any:
    value = config_module._default(field)
    return list(value) if isinstance(value, tuple) else value


def test_every_key_table_in_the_docs_lists_keys_of_its_section_at_their_defaults() -> None:
    rows = key_tables()
    assert len(rows) > 50, "the key tables were not found"
    wrong = []
    for place, section, key, default in rows:
        field = fields(section).get(key)
        if field is None:
            wrong.append(f"{place}: [{section}] has no key {key!r}")
        elif documented_value(default) != code_value(field):
            wrong.append(f"{place}: [{section}] {key} documented {default!r},"
                         f" the code's default is {code_value(field)!r}")
    assert not wrong, "\n".join(wrong)


# "`[store] max_inflated_mb` (default 512)", "`[http] recall_wait_seconds` (15 s)"
IN_PASSING = re.compile(r"`\[(\w+)\] (\w+)`,? \((?:default:? |at least )?"
                        r"([0-9][0-9.,]*\s*(?:MiB|KiB|MB|s|h)?)\b")


def test_a_default_the_docs_give_in_passing_is_the_codes() -> None:
    wrong, seen = [], 0
    for path in DOCS:
        text = path.read_text()
        for match in IN_PASSING.finditer(text):
            section, key, default = match.groups()
            if section not in SECTIONS:
                continue
            seen += 1
            field = fields(section).get(key)
            if field is None:
                wrong.append(f"{where(path, text, match.start())}: [{section}] has no key"
                             f" {key!r}")
            elif documented_value(default.strip()) != code_value(field):
                wrong.append(f"{where(path, text, match.start())}: [{section}] {key}"
                             f" ({default}), the code's default is {code_value(field)!r}")
    assert seen > 20, "the defaults given in passing were not found"
    assert not wrong, "\n".join(wrong)


def documented_keys() -> set[tuple[str, str]]:
    keys = {(section, key) for _, section, key, _ in key_tables()}
    for path in DOCS:
        text = path.read_text()
        keys.update(re.findall(r"\[(\w+)\]`? `?(\w+)", text))  # [sync] evict_after_days
        keys.update(re.findall(r"`(\w+)\.(\w+)`", text))  # `dicom.dimse_timeout`
        # A key in backticks in a paragraph that names its section (`syslog_host:syslog_port`).
        for paragraph in re.split(r"\n\s*\n", text):
            for section in set(re.findall(r"\[(\w+)\]", paragraph)) & set(SECTIONS):
                keys.update((section, key) for span in re.findall(r"`([^`]+)`", paragraph)
                            for key in re.findall(r"\w+", span))
        # TOML in the docs: keys under their [section] line.
        for block in re.finditer(r"^\[(\w+)\]\n((?:\w+ = .*\n)+)", text, re.M):
            keys.update((block.group(1), key) for key in re.findall(r"^(\w+) =", block.group(2),
                                                                   re.M))
    return keys


def test_every_config_key_is_in_the_docs_under_its_section() -> None:
    documented = documented_keys()
    missing = [f"[{section}] {f.name}" for section, cls in SECTIONS.items()
               for f in dataclasses.fields(cls) if (section, f.name) not in documented]
    assert not missing, "config keys the docs never name with their section: " + \
        ", ".join(missing)


def command_lines() -> list[tuple[str, list[str]]]:
    """(where, words after `pacs-edge`) of every command line in the docs' code."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"pacs-edge((?: +[^\s`|#]+)+)", text):
            try:
                words = shlex.split(match.group(1))
            except ValueError:
                words = match.group(1).split()
            found.append((where(path, text, match.start()), words))
    return found


def options_of(command: click.Command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def test_every_pacs_edge_command_line_in_the_docs_takes_the_options_it_shows() -> None:
    context = click.Context(main)
    wrong, checked = [], 0
    for place, words in command_lines():
        command: click.Command = main
        allowed = options_of(main)
        rest = words
        while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
            sub = command.get_command(context, rest[0])
            if sub is None:
                break
            command, rest = sub, rest[1:]
            allowed |= options_of(command)
        if command is main:
            continue  # prose: "pacs-edge serve" is a command, "pacs-edge is ..." is not
        checked += 1
        for word in rest:
            option = re.match(r"--[\w-]+", word)
            if option and option.group(0) not in allowed | {"--help"}:
                wrong.append(f"{place}: `pacs-edge {command.name}` has no option"
                             f" {option.group(0)}")
    assert checked > 100, "the command lines were not found"
    assert not wrong, "\n".join(wrong)
