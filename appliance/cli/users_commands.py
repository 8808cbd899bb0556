"""`pacs-edge users` (web accounts) and `pacs-edge link` (launch links for an EHR).

Passwords come from a 0600 file (`--password-file`, `-` for standard input, for
scripts and Ansible) or from a prompt asked twice; they are never an argument,
which would land in shell history and `ps`. Every change is audited as a User
Security Attributes Changed alert; the commands work while `serve` runs (the
index is shared, and a running server reads users from it on every login).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import click
from rich.table import Table

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.base.errors import UserError
from appliance.cli.common import (
    err,
    expected_errors,
    home_option,
    load,
    out,
    prompt_secret,
    refuse_readable_by_others,
)
from appliance.services.access import Role
from appliance.services.users import UserService, check_account
from appliance.store.clock_steps import still_ahead
from appliance.store.index import Index

T = TypeVar("T")
_ROLES = [role.value for role in Role]
_TTL = re.compile(r"^([1-9][0-9]{0,6})([smh])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}

password_file_option = click.option(
    "--password-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=None, help="Read the password from this 0600 file (its first line), or '-' for"
    " standard input; without it you are prompted twice.")


def _run(config: Config, action: Callable[[UserService], Awaitable[T]]) -> T:
    async def go() -> T:
        async with Index(config.index.path) as index:
            return await action(UserService(index, config))

    return asyncio.run(go())


def _change(config: Config, action: str, name: str,
            change: Callable[[UserService], Awaitable[object]], **details: str) -> None:
    """Apply one change to a user account and audit it (PS3.15: who changed whom)."""
    _run(config, change)
    with Auditor.for_home(config, process="cli") as auditor:
        auditor.user_changed(action, name=name, **details)


def read_password(path: Path | None) -> str:
    """The new password: from the file (refused if others may read it), '-' or a prompt."""
    if path is None:
        return prompt_secret("Password", confirm=True, error=UserError,
                             instead="--password-file")
    if str(path) == "-":
        try:  # bytes, decoded strictly: the stream's own decoding may let bad bytes through
            text = sys.stdin.buffer.readline().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("the password on standard input is not UTF-8 text",
                            hint="give the password as UTF-8 text") from None
    else:
        try:
            refuse_readable_by_others(path, "password file", UserError)
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read password file {path}: "
                            f"{getattr(exc, 'strerror', None) or exc}",
                            hint="give a readable UTF-8 text file") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise UserError("the password file's first line is empty",
                        hint="write the password on the file's first line")
    return password


def _when(at: float | None) -> str:
    if not at:
        return ""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def parse_ttl(text: str) -> int:
    """'15m', '900s', '1h' -> seconds."""
    match = _TTL.match(text.strip())
    if match is None:
        raise UserError(f"--ttl {text!r} is not a duration",
                        hint="a number and a unit: 900s, 15m or 1h")
    return int(match[1]) * _UNIT_SECONDS[match[2]]


@click.group()
def users() -> None:
    """Web users of the viewer and DICOMweb: admin, radiologist, referring."""


@users.command("add")
@home_option
@click.argument("name")
@click.option("--role", type=click.Choice(_ROLES, case_sensitive=False), required=True,
              help="admin and radiologist see every study; referring sees only the studies"
              " whose Referring Physician's Name is --referring.")
@click.option("--referring", "referring_name", default="",
              help="For --role referring: the name as the studies carry it, 'LAST^FIRST'.")
@password_file_option
@expected_errors
def users_add(home: Path | None, name: str, role: str, referring_name: str,
              password_file: Path | None) -> None:
    """Create a web user."""
    config = load(home)
    chosen = Role(role.lower())
    check_account(name, chosen, referring_name)
    _run(config, lambda s: s.require_user(name, exists=False))
    password = read_password(password_file)
    _change(config, "add", name,
            lambda s: s.add_user(name, chosen, password, referring_name=referring_name),
            role=chosen.value)
    scope = f", sees studies referred by {referring_name}" if referring_name else ""
    out.print(f"added user {name} (role {chosen.value}{scope})", highlight=False)


@users.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@expected_errors
def users_list(home: Path | None, as_json: bool) -> None:
    """The web users, their role and whether they are locked out."""
    import time

    config = load(home)
    listed = _run(config, lambda s: s.list_users())
    now, lockout = time.time(), config.auth.lockout_minutes * 60
    rows: list[dict[str, Any]] = [
        {"name": u.name, "role": u.role, "referring": u.referring_name,
         "locked_until": _when(u.locked_until) if still_ahead(u.locked_until, now, lockout)
         else "",
         "last_login": _when(u.last_login_at), "created": _when(u.created_at)}
        for u in listed]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        err.print("no users: add one with `pacs-edge users add NAME --role ...`",
                  highlight=False)
        return
    table = Table("name", "role", "referring", "locked until", "last login")
    for row in rows:
        table.add_row(row["name"], row["role"], row["referring"], row["locked_until"],
                      row["last_login"])
    out.print(table)


@users.command("remove")
@home_option
@click.argument("name")
@expected_errors
def users_remove(home: Path | None, name: str) -> None:
    """Delete a web user; their sessions end at once."""
    _change(load(home), "remove", name, lambda s: s.remove_user(name))
    out.print(f"removed user {name}", highlight=False)


@users.command("passwd")
@home_option
@click.argument("name")
@password_file_option
@expected_errors
def users_passwd(home: Path | None, name: str, password_file: Path | None) -> None:
    """Set a new password; the user's sessions end and a lock-out is lifted."""
    config = load(home)
    _run(config, lambda s: s.require_user(name, exists=True))
    password = read_password(password_file)
    _change(config, "passwd", name, lambda s: s.set_password(name, password))
    out.print(f"changed the password of {name}; their sessions have ended", highlight=False)


@users.command("unlock")
@home_option
@click.argument("name")
@expected_errors
def users_unlock(home: Path | None, name: str) -> None:
    """End a lock-out after failed logins now, rather than when it runs out."""
    _change(load(home), "unlock", name, lambda s: s.unlock(name))
    out.print(f"unlocked user {name}", highlight=False)


def default_base_url(config: Config) -> str:
    """https://<this host's name>:<[http] port>, what a browser on the LAN would open."""
    if not config.http.port:
        raise UserError("the web server is off ([http] port = 0): there is no default address"
                        " for the link", hint="pass --base-url with the address browsers open,"
                        " e.g. https://pacs.example.org:8443")
    return f"https://{socket.getfqdn()}:{config.http.port}"


def _base_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--base-url: an http:// or https:// URL with a host, no spaces or control characters."""
    if value is None:
        return None
    problem = ""
    if not value.isprintable() or any(c.isspace() for c in value):
        problem = "it holds a space or a control character"
    else:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  # raises ValueError for a port out of range or not a number
        except ValueError as exc:
            problem = str(exc)
        else:
            if parts.scheme.lower() not in ("http", "https"):
                problem = "it is not an http:// or https:// URL"
            elif not parts.hostname:
                problem = "it names no host"
            elif parts.query or parts.fragment:
                problem = "it has a query or fragment: the link adds its own"
    if problem:
        raise click.BadParameter(f"{value!r}: {problem}; give e.g. https://pacs.example.org:8443")
    return value


@click.command()
@home_option
@click.argument("study_uid")
@click.option("--user", "name", required=True, help="The web user the link logs in.")
@click.option("--ttl", default="15m", show_default=True,
              help="How long the link stays valid (s, m or h; at most [auth]"
              " link_max_ttl_minutes). It opens once.")
@click.option("--base-url", default=None, callback=_base_url,
              help="Where browsers reach the box, e.g. https://pacs.example.org:8443"
              " (default: this host's name and the [http] port).")
@expected_errors
def link(home: Path | None, study_uid: str, name: str, ttl: str, base_url: str | None) -> None:
    """Print a signed, expiring, one-time URL that opens STUDY_UID for a user."""
    config = load(home)
    seconds = parse_ttl(ttl)
    base = (base_url or default_base_url(config)).rstrip("/")  # before a link is signed
    token = _run(config, lambda s: s.sign_link(name, study_uid, ttl_seconds=seconds))
    with Auditor.for_home(config, process="cli") as auditor:
        auditor.user_changed("link", name=name, study_uid=study_uid)
    click.echo(f"{base}/launch?t={quote(token, safe='')}")
