"""`pacs-edge audit`: verify the hash chain and its anchors, export records, anchor on demand.

Exit codes of `audit verify`: 0 intact; 1 the log is damaged or contradicts
an anchor (the first bad record and why on stderr); 2 it could not be
checked (no data home, cloud unreachable, a bad anchor key).

Like cli_cloud.py, this module is a composition root and may open the blob
store (anchors live in the cloud container); the serving process never does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.base.errors import PacsEdgeError
from appliance.cli.common import err, expected_errors, home_option, load, out

if TYPE_CHECKING:
    from appliance.audit.anchor import Anchors
    from appliance.base.config import Config


@click.group()
def audit() -> None:
    """The audit trail (<home>/audit/audit.log): verify, export, anchor."""


@audit.command("verify")
@home_option
@click.option("--local-only", is_flag=True,
              help="Check the chain only, without the cloud anchors (tail truncation and a"
                   " recomputed chain then go unnoticed).")
@expected_errors
def verify(home: Path | None, local_only: bool) -> None:
    """Check that no record was edited, removed or reordered, and that the tail is whole."""
    from appliance.audit.log import AuditLog
    from appliance.audit.verify import verify_log

    config = load(home)
    # Anchors first: the log only grows, so every anchor read now is within it.
    found = None if local_only else _anchors(config)
    anchors = found.own if found is not None else []
    report = verify_log(AuditLog.for_home(config.home), anchors, progress=_progress)
    if report.problem is not None:
        err.print(f"[red]audit log damaged:[/red] {report.problem}", highlight=False)
        err.print(f"hint: records 1-{report.records} are intact; keep the file unchanged as"
                  " evidence and compare it with a syslog collector or an export",
                  highlight=False)
        sys.exit(1)
    latest = f", latest at record {anchors[-1].seq}" if anchors else ""
    where = "not checked (--local-only)" if local_only else f"{len(anchors)} checked{latest}"
    out.print(f"audit log intact: {report.records} record(s), head {report.head_hash[:16]};"
              f" anchors {where}", highlight=False)
    if found is not None and found.base:
        out.print(f"this home was restored: its anchors start above position {found.base};"
                  f" {len(found.predecessors)} anchor(s) of the lost box's log authenticated"
                  " (its records are not on this box)", highlight=False)


def _progress(checked: int, total: int) -> None:
    err.print(f"checked {checked / 2**30:.1f} of {total / 2**30:.1f} GB of the audit log",
              highlight=False)


@audit.command("export")
@home_option
@click.option("--since", default=None, help="Events at or after this UTC date/time (ISO 8601).")
@click.option("--until", default=None, help="Events before this UTC date/time (ISO 8601).")
@click.option("--format", "fmt", type=click.Choice(["json", "dicom-xml"]), default="json",
              show_default=True, help="json: one JSON object per line; dicom-xml: PS3.15"
              " AuditMessage elements.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write to this file (created 0600: it holds PHI).")
@expected_errors
def export(home: Path | None, since: str | None, until: str | None, fmt: str,
           out_path: Path | None) -> None:
    """Export audit records (they contain PHI: handle the output accordingly)."""
    from appliance.audit import Auditor
    from appliance.audit.export import entries_between, export_json, export_xml, parse_when
    from appliance.audit.log import AuditLog

    config = load(home)
    try:
        start, end = (parse_when(since) if since else None), (parse_when(until) if until else None)
    except ValueError as exc:
        raise PacsEdgeError(f"not an ISO 8601 date or date-time: {exc}",
                            hint="e.g. --since 2026-01-31 or --since 2026-01-31T08:00") from exc
    fd = None if out_path is None else _create_export_file(out_path)
    with Auditor.for_home(config, process="cli") as auditor:
        auditor.audit_log_used(f"export {fmt}")
    unreadable: list[int] = []
    entries = entries_between(AuditLog.for_home(config.home), start, end,
                              unreadable=unreadable)
    chunks: Iterator[str] = export_json(entries) if fmt == "json" else export_xml(entries)
    if fd is None:
        for chunk in chunks:
            sys.stdout.write(chunk)
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(chunks)
    if unreadable:  # an export that silently lacks records would mislead its reviewer
        shown = ", ".join(map(str, unreadable[:10])) + (" ..." if len(unreadable) > 10 else "")
        err.print(f"warning: {len(unreadable)} line(s) of the audit log cannot be read and"
                  f" are not in the export (lines {shown}); run `pacs-edge audit verify`",
                  highlight=False, markup=False)
        raise SystemExit(1)


def _create_export_file(path: Path) -> int:
    """A new 0600 file at `path`, opened for writing.

    The export holds PHI: it never overwrites a file (O_EXCL), and never
    writes through a symlink planted at `path` (O_EXCL refuses any existing
    name, a symlink included; O_NOFOLLOW says so again).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        kind = "a symlink" if path.is_symlink() else "a file"
        raise PacsEdgeError(f"{path} exists ({kind}): an export never overwrites",
                            hint="give --out a new file name") from None
    except OSError as exc:
        raise PacsEdgeError(f"cannot create {path}: {exc.strerror}",
                            hint="give --out a file in a folder you can write") from exc


@audit.command("anchor")
@home_option
@expected_errors
def anchor(home: Path | None) -> None:
    """Anchor the log head in the cloud container now (the sync agent does it periodically)."""
    from appliance.audit.anchor import load_base, load_key, write_anchor
    from appliance.audit.log import AuditLog
    from sync.blobstore.factory import open_blob_store

    config = load(home)
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        made = write_anchor(AuditLog.for_home(config.home), store,
                            load_key(config.home, create=True), base=load_base(config.home))
    finally:
        store.close()
    out.print("audit log is empty: nothing to anchor" if made is None
              else f"anchored record {made.seq}", highlight=False)


def _anchors(config: Config) -> Anchors:
    from appliance.audit.anchor import ANCHOR_PREFIX, Anchors, load_base, load_key, read_anchors
    from sync.blobstore.factory import open_blob_store

    base = load_base(config.home)
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        if next(iter(store.list(ANCHOR_PREFIX)), None) is None:
            return Anchors(base, [], [])  # never anchored: no key needed yet
        return read_anchors(store, load_key(config.home), base=base)
    finally:
        store.close()
