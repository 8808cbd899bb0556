"""Shared pieces of the command line: consoles, the --home option, error handling, progress
bars, and the audit record of an operator's change."""

from __future__ import annotations

import errno
import importlib
import os
import pwd
import shlex
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from appliance.base import logsafe
from appliance.base.config import Config, load_config, resolve_home
from appliance.base.errors import HomeError, PacsEdgeError
from provisioning.home import LOG_KEY, SECRETS_DIR

F = TypeVar("F", bound=Callable[..., Any])

# OSErrors about a path the operator named or the data home holds: an expected failure
# (a file where a folder should be, a missing folder, a full disk), reported as one line.
# Any other OSError (EBADF, EINVAL, one without errno or file name) is a bug and surfaces.
_PATH_ERRNOS = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM,
    errno.ELOOP, errno.ENAMETOOLONG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO,
    errno.ENXIO, errno.ETXTBSY, errno.EMLINK, errno.ENOTEMPTY,
})
_PATH_HINTS = {
    errno.ENOENT: "check that the path and the folders above it exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder; a file was expected",
    errno.EACCES: "check the permissions of the path and its folders",
    errno.EPERM: "check the permissions of the path and its folders",
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space (the disk quota is exhausted)",
    errno.ELOOP: "a symbolic link in the path points back at itself",
}

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def expected_errors(func: F) -> F:
    """Expected failures as one `error:` line, maybe a `hint:` line, and exit code 2:
    a PacsEdgeError; an OSError about a path (a file where a folder should be, a missing
    folder, a full disk: see _PATH_ERRNOS), as `<strerror>: <filename>`. Anything else
    is a bug and keeps its traceback."""

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
        except OSError as exc:
            if not _is_path_error(exc):
                raise
            err.print(f"[red]error:[/red] {escape(_path_error_message(exc))}", highlight=False)
            if exc.errno in _PATH_HINTS:
                err.print(f"hint: {_PATH_HINTS[exc.errno]}", highlight=False, markup=False)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def _is_path_error(exc: OSError) -> bool:
    """An OSError about a named path that the operator can fix (see _PATH_ERRNOS)."""
    return exc.errno in _PATH_ERRNOS and exc.filename is not None


def _path_error_message(exc: OSError) -> str:
    """`<strerror>: <filename>` (`-> <filename2>` for a rename or link)."""
    reason = exc.strerror or os.strerror(exc.errno or 0)
    where = _name(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {_name(exc.filename2)}"
    return f"{reason}: {where}"


def _name(filename: object) -> str:
    if isinstance(filename, str | bytes | os.PathLike):
        return os.fsdecode(filename)
    return str(filename)


def refuse_readable_by_others(path: Path, what: str,
                              error: type[PacsEdgeError]) -> None:
    """Refuse a secret's file (`what`: "password file") that group or others may read.

    OSError (a missing file) is the caller's to report."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise error(f"{what} {path} has mode {mode:04o}: group or others can read it",
                    hint=f"chmod 600 {path}")


def prompt_secret(label: str, *, confirm: bool, error: type[PacsEdgeError],
                  instead: str) -> str:
    """A password or passphrase typed at a hidden prompt; `error` when it is not UTF-8
    (a terminal's bad bytes come as surrogates, or fail the decoding)."""
    try:
        typed = str(click.prompt(label, hide_input=True, confirmation_prompt=confirm,
                                 err=True))
        typed.encode("utf-8")
    except UnicodeError:
        raise error(f"the {label.lower()} typed is not UTF-8 text",
                    hint=f"set the terminal to UTF-8, or use {instead}") from None
    return typed


@contextmanager
def count_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr that counts things done (studies, packs); yields the
    `(done, total)` callback the long operations take. It shows only in a terminal and
    goes when done; log lines print above it (appliance/base/logsetup.py)."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


home_option = click.option(
    "--home", "home", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Data home (default: $PACS_EDGE_HOME, else ./data).",
)


def load(home: Path | None) -> Config:
    """The data home's config, for a command that may write in the home. The command's
    log lines then name studies, files and users with the home's keyed references, the
    ones serve and the agent use, which `pacs-edge logref` maps back."""
    resolved = resolve_home(home)
    refuse_root_in_a_users_home(resolved)
    config = load_config(resolved)
    logsafe.load_key(config.home / SECRETS_DIR / LOG_KEY)
    return config


def refuse_root_in_a_users_home(home: Path) -> None:
    """Root may not work in a data home that another user (the service user) owns.

    What it made there would be root's, and the service could not open it: an
    index that `status` created before the first start (serve then stops at once:
    "attempt to write a readonly database"), a recalled study's files, secrets
    written by `init` or `keys recover`. A missing home is the command's to report."""
    if os.geteuid() != 0:
        return
    try:
        owner = home.stat().st_uid
    except OSError:
        return
    if owner == 0:
        return
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        raise HomeError(
            f"data home {home} belongs to user id {owner}, and this runs as root: what it"
            " wrote there would be root's, and the service could not use it",
            hint="run it as the user the service runs as") from None
    raise HomeError(
        f"data home {home} belongs to {name}, and this runs as root: what it wrote there"
        " would be root's, and the service could not use it",
        hint=f"run it as {name}: runuser -u {name} -- {shlex.join(sys.argv)}")


def audit_change(config: Config, what: str, *, security: bool = True,
                 failure: str = "") -> None:
    """An operator changed configuration, keys, certificates or readers: a Security
    Alert (Security Configuration; with `security=False` Software Configuration) in the
    audit trail. `what` names the change, never a secret or patient data; `failure`
    says why it failed (outcome 4)."""
    from appliance.audit import Auditor

    with Auditor.for_home(config, process="cli") as auditor:
        auditor.configuration_changed(what, security=security, failure=failure)


def audit_failure(config: Config, what: str, failure: PacsEdgeError) -> None:
    """An operator's security change that failed (`audit_change` with outcome 4), for a
    command about to report `failure`: a record that cannot be written is a note on
    stderr, never the error the operator sees in place of `failure`."""
    try:
        audit_change(config, what, failure=failure.message)
    except (PacsEdgeError, OSError) as exc:
        err.print(f"note: the audit record of this failure was not written ({exc})",
                  highlight=False, markup=False)


def audit_shown(config: Config, command: str, *, matches: int,
                patients: Iterable[tuple[str, str]] = (),
                study_uids: Iterable[str] = ()) -> None:
    """An operator's command is about to show patient data: a Query record naming the
    operator, the command, the patients (ID, name) and studies shown. Written before
    the output, and the command fails without it (Auditor's exit)."""
    from appliance.audit import Auditor

    with Auditor.for_home(config, process="cli") as auditor:
        auditor.operator_queried(command, matches=matches, patients=patients,
                                 study_uids=study_uids)


# Exit code of a command Ctrl-C (SIGINT) ended: 128 + SIGINT, as a shell reports it.
INTERRUPTED_EXIT = 130

# What a command cut short left, and what to do: each resumes, or rolls back, by itself.
_AFTER_INTERRUPT = {
    "import": "the files stored before it are kept, each whole and indexed; run the same"
              " import again: those are skipped as already present",
    "recall": "a recall cut short is rolled back and the study stays evicted; run the same"
              " recall again",
    "restore": "run the same restore again: it resumes at the first version not restored",
    "migrate": "`pacs-edge migrate resume` goes on where the run stopped",
}
_AFTER_INTERRUPT_DEFAULT = ("run the same command again: a command cut short resumes, or rolls"
                            " back what it left half done")


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when named (click's documented
    lazy-loading pattern): `pacs-edge peers add` need not import the pydicom, cloud
    and web stacks that other commands use (~0.5 s of CPU for every short command).
    `lazy` maps a command name to "module:attribute"."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attribute = target.split(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


class RootGroup(LazyGroup):
    """The `pacs-edge` group. A Ctrl-C (SIGINT) that ends a command is one `error:` line,
    a hint saying what was kept, and INTERRUPTED_EXIT. click's own answer was `Aborted!`
    and exit code 1, which said nothing of what the command left, and which a script
    takes for import's rejected file, fsck's inconsistency or scrub's damaged pack."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand or "command"
            err.print(f"[red]error:[/red] interrupted (Ctrl-C): pacs-edge {escape(command)}"
                      " stopped before it finished", highlight=False)
            err.print(f"hint: {_AFTER_INTERRUPT.get(command, _AFTER_INTERRUPT_DEFAULT)}",
                      highlight=False, markup=False)
            sys.exit(INTERRUPTED_EXIT)
