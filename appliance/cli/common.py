"""Shared pieces of the command line: consoles, the --home option, error handling, and the
audit record of an operator's change."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from appliance.base.config import Config, load_config, resolve_home
from appliance.base.errors import PacsEdgeError

F = TypeVar("F", bound=Callable[..., Any])

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def expected_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PacsEdgeError as exc:
            # Messages quote config sections ("[cloud] url"): never read them as markup.
            err.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False)
            if exc.hint:
                err.print(f"hint: {exc.hint}", highlight=False, markup=False)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


home_option = click.option(
    "--home", "home", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Data home (default: $PACS_EDGE_HOME, else ./data).",
)


def load(home: Path | None) -> Config:
    return load_config(resolve_home(home))


def audit_change(config: Config, what: str, *, security: bool = True) -> None:
    """An operator changed configuration, keys, certificates or readers: a Security
    Alert (Security Configuration; with `security=False` Software Configuration) in the
    audit trail. `what` names the change, never a secret or patient data."""
    from appliance.audit import Auditor

    with Auditor.for_home(config, process="cli") as auditor:
        auditor.configuration_changed(what, security=security)
