"""`pacs-edge logref`: what a keyed reference in a log line names.

Log lines never carry patient data: a study, instance, web user, order or
dropped file is named by a short keyed hash (`study=4f4fa342c5cf`,
`file=7e1efd5925dd`) with the home's log key, which only the box holds. This
hashes every candidate the same way (the index's UIDs, names and accession
numbers; every path below the watched drop folders, and where a file was
dropped for those in `.done/` and `.rejected/`) and prints the matches, for the
operator on the box and nobody else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import click

from appliance.base import logsafe
from appliance.base.config import Config
from appliance.cli.common import err, expected_errors, home_option, load, out
from appliance.dropfolder.layout import DropLayout, Root
from appliance.dropfolder.processor import path_ref
from appliance.store.log_refs import named_values

_REF = re.compile(r"^[0-9a-f]{12}$")


@click.command()
@home_option
@click.argument("refs", nargs=-1, required=True)
@expected_errors
def logref(home: Path | None, refs: tuple[str, ...]) -> None:
    """Show what log references (study=..., file=..., user=...) name: REF is the 12 hex
    digits after the '='. Exits 1 when one names nothing this box still holds."""
    wanted = {ref.strip().lower().rpartition("=")[2] for ref in refs}
    bad = sorted(ref for ref in wanted if not _REF.match(ref))
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: a reference is 12 hex digits",
                                 param_hint="REFS")
    config = load(home)
    found = sorted((ref, what, shown) for what, shown, ref in _candidates(config)
                   if ref in wanted)
    for ref, what, shown in found:  # whole lines: a table would cut the UIDs and paths
        out.print(f"{ref}  {what}  {shown}", highlight=False, markup=False)
    missing = sorted(wanted - {ref for ref, _what, _shown in found})
    for ref in missing:
        err.print(f"{ref}: names nothing this box holds now (a file or study gone since,"
                  " or a line from another box)", highlight=False)
    if missing:
        raise SystemExit(1)


def _candidates(config: Config) -> Iterator[tuple[str, str, str]]:
    """(what, the value to show, its reference) for everything a log line may name."""
    for what, value in named_values(config.index.path):
        yield what, value, logsafe.ref(value)
    for root in DropLayout.from_config(config).roots:
        # A file moved to .done/ or .rejected/ keeps its place below the root there.
        for base in (root.path, root.done, root.rejected):
            for path in _below(base):
                yield "dropped", str(path), path_ref(path, Root(base))


def _below(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            yield Path(dirpath) / name
