"""Commands for remote readers and for restoring a lost box.

Edge side:     readers add | list | remove       (sync.readers)
Reader side:   reader init | list | pull         (sync.reader_client; no site key)
Restore:       keys escrow | keys recover        (provisioning.escrow)
               restore                           (sync.restore)

The command line is the composition root (see cli_cloud), so it wires the
sync package, provisioning and the config together here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from appliance.base.config import CONFIG_FILE, Config, is_ae_title, load_config
from appliance.base.errors import PacsEdgeError
from appliance.base.human import human_size
from appliance.base.logsetup import setup_logging
from appliance.cli.common import (
    audit_change,
    audit_failure,
    count_bar,
    err,
    expected_errors,
    home_option,
    load,
    out,
    prompt_secret,
    refuse_readable_by_others,
    refuse_root_in_a_users_home,
)

# --- edge: readers -------------------------------------------------------------------


@click.group()
def readers() -> None:
    """Remote readers who may pull studies from the cloud with their own key."""


@readers.command("add")
@home_option
@click.argument("name")
@click.argument("public_key")
@click.option("--scope", default="all", show_default=True,
              help="all, referring:NAME (wildcards * ?) or modality:CT,MR")
@expected_errors
def readers_add(home: Path | None, name: str, public_key: str, scope: str) -> None:
    """Add a reader and grant it every replicated study in scope (no re-upload).

    Running it again for the same reader repairs grants that are missing."""
    from sync.readers import add_reader, grant_reader

    config = load(home)
    reader, new = add_reader(config.home, name, public_key, scope)
    if new:
        audit_change(config, f"reader {name} added")

    async def grant(progress: Callable[[int, int], None]) -> Any:
        from appliance.store.index import Index
        from provisioning.keyring import load_keyring
        from sync.blobstore.factory import open_blob_store
        from sync.sitekeys import site_keys_in_use

        store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
        try:
            with site_keys_in_use(config.home):
                async with Index(config.index.path) as index:
                    return await grant_reader(index, store, load_keyring(config.home), reader,
                                              on_progress=progress)
        finally:
            store.close()

    with count_bar("granting") as progress:
        report = asyncio.run(grant(progress))
    verb = "added" if new else "reader exists unchanged:"
    out.print(f"{verb} reader {name} (id {reader.reader_id}, scope {reader.scope}); granted "
              f"{report.granted} pack version(s), {report.already} already granted",
              highlight=False)
    for failure in report.failures or []:
        err.print(f"  grant failed: {failure}", highlight=False)
    if report.failures:
        err.print("run the same command again to retry the failed grants", highlight=False)
        raise SystemExit(1)


@readers.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def readers_list(home: Path | None, as_json: bool) -> None:
    """Show the registered readers."""
    from sync.readers import load_readers

    listed = load_readers(load(home).home)
    rows = [{"name": r.name, "reader_id": r.reader_id, "scope": str(r.scope),
             "public_key": r.public_text} for r in listed.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "id", "scope", "public key")
    for row in rows:
        table.add_row(row["name"], row["reader_id"], row["scope"], row["public_key"])
    out.print(table if rows else "no readers")


@readers.command("remove")
@home_option
@click.argument("name")
@expected_errors
def readers_remove(home: Path | None, name: str) -> None:
    """Remove a reader: no new grants, and every key object it had is deleted.

    What the reader already downloaded stays with the reader."""
    from sync.blobstore.factory import open_blob_store
    from sync.readers import forget_reader, load_readers, revoke_reader

    config = load(home)
    reader = load_readers(config.home).get(name)
    if reader is None:
        forget_reader(config.home, name)  # raises the "no reader" error with its hint
        return
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        deleted = revoke_reader(store, reader.reader_id)
        forget_reader(config.home, name)
        deleted += revoke_reader(store, reader.reader_id)  # a grant that raced the removal
    finally:
        store.close()
    audit_change(config, f"reader {name} removed")
    out.print(f"removed reader {name}; deleted {deleted} key object(s). Files the reader "
              "already pulled cannot be taken back", highlight=False)


# --- reader side ---------------------------------------------------------------------


@click.group()
def reader() -> None:
    """For a remote reader: find and pull the studies granted to your key."""


_reader_home = click.option("--home", "home", required=True,
                            type=click.Path(file_okay=False, path_type=Path),
                            help="The reader's home (key and config).")


@reader.command("init")
@_reader_home
@click.option("--cloud", "cloud_url", required=True,
              help="The site's cloud URL: file:///PATH or azure://CONTAINER.")
@click.option("--credentials-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="For azure://: a 0600 file with a connection string that "
              "can read the container (else $AZURE_STORAGE_CONNECTION_STRING).")
@expected_errors
def reader_init(home: Path, cloud_url: str, credentials_file: Path | None) -> None:
    """Make this reader's key pair and config; print the public key (last line)."""
    from sync.reader_client import init_reader

    public, created = init_reader(home, cloud_url, credentials_file)
    for item in created:
        out.print(f"created {item}", highlight=False)
    out.print("give the site's administrator this public key (the private key stays here):",
              highlight=False)
    click.echo(public)


_DATE = re.compile(r"^([0-9]{8})?(-([0-9]{8})?)?$")


@reader.command("list")
@_reader_home
@click.option("--patient", default=None, help="Part of the patient's name or ID.")
@click.option("--date", default=None, help="YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-.")
@click.option("--modality", default=None, help="A modality in the study, e.g. CT.")
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def reader_list(home: Path, patient: str | None, date: str | None, modality: str | None,
                as_json: bool) -> None:
    """The studies granted to this reader, searchable."""
    from sync.reader_client import EMPTY_CLOUD_HINT, UPGRADE_HINT, ReaderClient, matches

    if date is not None and (not _DATE.match(date) or date in ("", "-")):
        raise PacsEdgeError(f"invalid --date {date!r}",
                            hint="use YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
    with ReaderClient.open(home) as client:
        catalogue = client.catalogue()
    rows = [s.summary() for s in catalogue.studies.values()
            if not catalogue.unreadable(s.study_key)]
    # A study whose every instance left it for another study (withdrawn) has nothing to
    # pull: the site's box no longer answers it either.
    rows = sorted((r for r in rows if r["instances"]
                   and matches(r, patient=patient, date=date, modality=modality)),
                  key=lambda r: (str(r["study_date"]), str(r["study_time"])))
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    elif rows:
        _print_studies(rows)
    elif catalogue.cloud_empty:
        err.print("no studies are granted to this reader: the cloud holds no studies at all",
                  highlight=False)
        err.print(f"hint: {EMPTY_CLOUD_HINT}", highlight=False, markup=False)
    else:
        err.print("no granted studies match" if catalogue.studies else
                  "no studies are granted to this reader (yet)", highlight=False)
    if catalogue.failures:
        err.print(f"[red]error:[/red] {len(catalogue.failures)} granted study(ies) failed "
                  "verification and are not listed", highlight=False)
        err.print("hint: the cloud copy was modified or damaged; tell the site's administrator",
                  highlight=False)
    if catalogue.newer_format:
        err.print(f"[red]error:[/red] {len(catalogue.newer_format)} granted study(ies) are in "
                  "a format only a newer pacs-edge reads and are not listed", highlight=False)
        err.print(f"hint: {UPGRADE_HINT}", highlight=False, markup=False)
    if catalogue.failures or catalogue.newer_format:
        raise SystemExit(2)


def _print_studies(rows: list[dict[str, object]]) -> None:
    """A table where the terminal is wide enough for every column whole, else one block
    per study: the study UID is what `reader pull` takes, and a table squeezed into 80
    columns cut it off (a UID runs to 64 characters)."""
    cells = [_study_cells(r) for r in rows]
    table = Table("date", "patient", "patient id", "modalities", "description",
                  "instances", "study uid")
    for row in cells:
        table.add_row(*row)
    if out.measure(table, options=out.options.update_width(10_000)).maximum <= out.width:
        out.print(table)
        return
    for date, name, patient_id, modalities, description, instances, uid in cells:
        out.print(Text.assemble((date, "bold"), f"  {modalities}  {instances} instance(s)  "
                                f"{description}".rstrip()), highlight=False)
        out.print(f"  patient: {name} (id {patient_id})", highlight=False, markup=False)
        out.print(f"  study uid: {uid}", highlight=False, markup=False, overflow="ignore",
                  crop=False)


def _study_cells(row: dict[str, object]) -> tuple[str, ...]:
    modalities = row["modalities"]
    assert isinstance(modalities, list)
    return (str(row["study_date"]), str(row["patient_name"]), str(row["patient_id"]),
            ",".join(modalities), str(row["study_description"]), str(row["instances"]),
            str(row["study_uid"]))


_AE_TITLE_RULE = "1-16 ASCII characters, printable, no backslash"


def _ae_title(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An AE title as [dicom] ae_title takes it, padding stripped (checked before any work)."""
    if not is_ae_title(value):
        raise click.BadParameter(f"{value!r} is not an AE title: use {_AE_TITLE_RULE}")
    return value.strip()


def _destination(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """AE@HOST:PORT, its AE title checked as --calling-ae's: a typo fails before the pull."""
    from sync.reader_client import parse_address

    if value is None:
        return None
    try:
        ae_title, _, _ = parse_address(value)
    except PacsEdgeError as exc:
        raise click.BadParameter(f"{exc.message} ({exc.hint})" if exc.hint else exc.message
                                 ) from None
    if not is_ae_title(ae_title):
        raise click.BadParameter(f"{ae_title!r} is not an AE title: use {_AE_TITLE_RULE}")
    return value


@reader.command("pull")
@_reader_home
@click.argument("study_uid")
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the Part 10 files (default: HOME/studies/STUDY_UID).")
@click.option("--send", "send", default=None, metavar="AE@HOST:PORT", callback=_destination,
              help="Then C-STORE every file to this workstation.")
@click.option("--calling-ae", default="PEREADER", show_default=True, callback=_ae_title,
              help="Our AE title when sending.")
@expected_errors
def reader_pull(home: Path, study_uid: str, to: Path | None, send: str | None,
                calling_ae: str) -> None:
    """Download, decrypt and verify a granted study; resumes an interrupted pull."""
    from sync.reader_client import ReaderClient, send_files

    with ReaderClient.open(home) as client:
        study = client.catalogue().find(study_uid)
        target = to if to is not None else Path(home) / "studies" / study_uid
        with Progress(TextColumn("pulling"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                      transient=True) as progress:
            task = progress.add_task("pull", total=None)
            report = client.pull(study, target, on_progress=lambda done, total: progress.update(
                task, completed=done, total=total))
    out.print(f"pulled {report.written + report.skipped} instance(s) to {target}: "
              f"{report.written} downloaded and verified, {report.skipped} already there",
              highlight=False)
    if study.not_granted:
        _refuse_ungranted(study.not_granted, sending=send is not None)
    if send is None:
        return
    with count_bar("sending") as progress_cb:
        sent = send_files(report.files, send, calling_ae=calling_ae, on_progress=progress_cb)
    out.print(f"sent {sent.sent} instance(s) to {send}", highlight=False)
    for failure in sent.failed:
        err.print(f"  not stored: {failure}", highlight=False)
    if sent.failed:
        raise SystemExit(1)


def _refuse_ungranted(versions: list[int], *, sending: bool) -> None:
    """A study the reader cannot read whole: what was pulled is verified, but it is not
    the study (exit 1, and nothing sent to the workstation)."""
    which = (f"version {versions[0]} of this study is" if len(versions) == 1 else
             f"versions {', '.join(map(str, versions))} of this study are")
    err.print(f"[red]error:[/red] {which} in the cloud but not granted to this reader: the "
              "instances pulled may be incomplete or out of date"
              + ("; nothing was sent" if sending else ""), highlight=False)
    err.print("hint: ask the site's administrator to run `pacs-edge readers add` for this "
              "reader again (it adds missing grants), then pull again; a version still being "
              "uploaded is granted once the site has verified it", highlight=False,
              markup=False)
    raise SystemExit(1)


# --- keys escrow / recover -----------------------------------------------------------


def _passphrase(passphrase_file: Path | None, *, confirm: bool) -> str:
    from provisioning.escrow import read_passphrase_file
    from provisioning.provisioning_errors import EscrowError

    if passphrase_file is not None:
        # As users' --password-file; a file it cannot stat, read_passphrase_file reports.
        with suppress(OSError):
            refuse_readable_by_others(passphrase_file, "passphrase file", EscrowError)
        return read_passphrase_file(passphrase_file)
    return prompt_secret("escrow passphrase", confirm=confirm, error=EscrowError,
                         instead="--passphrase-file")


@click.command("escrow")
@home_option
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False,
                                                                  path_type=Path),
              help="The escrow file to write (0600, never overwritten).")
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Read the passphrase from this 0600 file (else prompted).")
@expected_errors
def keys_escrow(home: Path | None, out_file: Path, passphrase_file: Path | None) -> None:
    """Export the site key, name secret, log key and audit key, encrypted with a passphrase."""
    from provisioning.escrow import check_passphrase, export_escrow
    from provisioning.keyring import load_keyring

    config = load(home)
    passphrase = _passphrase(passphrase_file, confirm=True)
    check_passphrase(passphrase)
    kid = export_escrow(config.home, out_file, passphrase)
    audit_change(config, "site key escrowed")
    out.print(f"wrote {out_file} (site key {kid}); keep it offline, and the passphrase "
              "somewhere else", highlight=False)
    if load_keyring(config.home).rotation_pending:
        out.print("a key rotation is pending: run `pacs-edge keys rotate` to finish it (it "
                  "retires the old key); keep the older escrow file until then",
                  highlight=False, markup=False)


@click.command("recover")
@click.option("--home", "home", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The new data home (its secrets must not exist yet).")
@click.option("--from", "from_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Read the passphrase from this 0600 file (else prompted).")
@expected_errors
def keys_recover(home: Path, from_file: Path, passphrase_file: Path | None) -> None:
    """Put escrowed site secrets into a new data home (never overwrites)."""
    from provisioning.escrow import recover_escrow
    from provisioning.home import AUDIT_KEY
    from provisioning.site_key_id import published_key_id

    refuse_root_in_a_users_home(home)
    escrow = from_file.absolute()
    try:
        passphrase = _passphrase(passphrase_file, confirm=False)
        written = recover_escrow(from_file, home, passphrase)
    except PacsEdgeError as exc:
        audit_failure(_recovering(home), f"site key recovery from escrow file {escrow}", exc)
        raise
    audit_change(_recovering(home),
                 f"site key {published_key_id(home)} recovered from escrow file {escrow}")
    for path in written:
        out.print(f"wrote {path}", highlight=False)
    if not any(path.name == AUDIT_KEY for path in written):
        err.print("note: this escrow file (format version 1) holds no audit anchor key: the "
                  "lost box's audit anchors cannot be authenticated on this box",
                  highlight=False)
    out.print(f"next: pacs-edge init --home {home}, then pacs-edge restore --home {home} "
              "--cloud URL", highlight=False)


_RESTORE = "index restore from the cloud"


def _recovering(home: Path) -> Config:
    """The config a key recovery is audited with: the home's once it is initialised;
    before `init`, where the operator guide recovers, the defaults (the audit log is the
    home's all the same: this box's trail begins with the recovery)."""
    return load_config(home) if (home / CONFIG_FILE).is_file() else Config(home=home)


# --- restore -------------------------------------------------------------------------


@click.command()
@click.option("--home", "home", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--cloud", "cloud_url", default=None,
              help="The lost box's cloud URL (default: the home's [cloud] url).")
@expected_errors
def restore(home: Path, cloud_url: str | None) -> None:
    """Rebuild the index from the cloud manifests; studies come back evicted, except
    instances whose files the store still holds intact: those stay local.

    Run after `keys recover` and `init`. Running it again changes nothing."""
    from appliance.audit.anchor import set_base_after_restore
    from appliance.store.files import FileStore
    from appliance.store.index import Index
    from provisioning.keyring import load_keyring
    from provisioning.site_secrets import load_name_secret
    from sync.blobstore.factory import open_blob_store
    from sync.restore import restore_index
    from sync.sitekeys import site_keys_in_use

    if not (home / CONFIG_FILE).exists():
        raise PacsEdgeError(f"{home} is not an initialised data home",
                            hint=f"run `pacs-edge keys recover --home {home} --from FILE`, "
                            f"then `pacs-edge init --home {home}`")
    config = load(home)
    setup_logging("warning")
    new_url = cloud_url if cloud_url is not None and cloud_url != config.cloud_url else None
    try:
        if new_url:
            _check_cloud_url(config, new_url)
            config = dataclasses.replace(config, cloud=dataclasses.replace(config.cloud,
                                                                            url=new_url))
        store = open_blob_store(config.cloud_url,
                                credentials_file=config.cloud.credentials_file)
    except PacsEdgeError as exc:
        audit_failure(config, _RESTORE, exc)
        raise

    async def run(progress: Callable[[int, int], None]) -> Any:
        with site_keys_in_use(config.home):
            ring = load_keyring(config.home)
            name_secret = load_name_secret(config.home)
            async with Index(config.index.path) as index:
                return await restore_index(index, store, ring, name_secret=name_secret,
                                           files=FileStore(config.store.path),
                                           on_progress=progress)

    try:
        with count_bar("restoring") as progress:
            report = asyncio.run(run(progress))
        # This box's audit log starts again at 1: its anchors go above the lost box's.
        set_base_after_restore(config.home, store)
    except PacsEdgeError as exc:
        audit_failure(config, _RESTORE, exc)
        raise
    finally:
        store.close()
    # Recorded, a URL whose packs all failed (another box's cloud, another key) would keep
    # the right one out ("already names another cloud"), and the agent would write there.
    # A lost box that never uploaded a study has nothing to restore and nothing fails.
    nothing = bool(new_url and report.failures) and not (report.restored or report.already)
    refused = PacsEdgeError(f"nothing could be restored from {_shown(config.cloud_url)};"
                            " the URL was not recorded", hint="check the URL, and that"
                            " `keys recover` used this box's escrow file")
    unrecorded: PacsEdgeError | None = None
    if nothing:
        audit_failure(config, _RESTORE, refused)
    else:
        if new_url:
            unrecorded = _record_cloud_url(config)
        audit_change(config, "index restored from the cloud", failure=(
            f"{len(report.failures)} pack version(s) failed" if report.failures else ""))
    out.print(f"restored {report.restored} pack version(s) of {len(report.studies)} study(ies), "
              f"{report.instances} instance(s); {report.already} already in the index; "
              f"{len(report.failures)} failed"
              + (f" ({len(report.misfiled)} study folder(s) hold another study's manifest)"
                 if report.misfiled else ""), highlight=False)
    if report.local:
        out.print(f"kept {report.local} instance(s) ({human_size(report.local_bytes)}) the "
                  "store holds intact: local, not evicted", highlight=False)
    for failure in report.failures:
        err.print(f"  failed: {failure}", highlight=False)
    if nothing:
        raise refused
    if unrecorded is not None:
        raise unrecorded
    if report.failures:
        raise SystemExit(1)


def _shown(cloud_url: str) -> str:
    return cloud_url.split("?", 1)[0]  # never a SAS token


def _check_cloud_url(config: Config, cloud_url: str) -> None:
    """Refuse a --cloud the home cannot take: it names another cloud already, or the
    URL names an empty container (a typo)."""
    from sync.blobstore.factory import open_blob_store

    if config.cloud.url:
        raise PacsEdgeError(f"{config.config_path} already names another cloud",
                            hint="edit [cloud] url there, or pass the same --cloud")
    store = open_blob_store(cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        empty = next(iter(store.list()), None) is None
    finally:
        store.close()
    if empty:
        raise PacsEdgeError(f"{_shown(cloud_url)} is empty: nothing to restore from",
                            hint="check the URL (for file://, the folder the lost box's"
                            " [cloud] url named)")


def _record_cloud_url(config: Config) -> PacsEdgeError | None:
    """Record the restored-from cloud URL (config.cloud.url) in the home's config file
    (comments kept), once something was restored from it; the error to end with when
    the file cannot be written.

    A home whose config is a link to a file kept elsewhere (/etc/pacs-edge in
    docs/deployment.md) gets the file behind the link rewritten, with its owner and
    mode: replacing the link itself would leave /etc's file governing nothing. There
    the service user, who runs restore, may not write: the restore stands, and the
    operator is told what to write and where."""
    import tomlkit

    from appliance.base.durable import atomic_rewrite

    doc = tomlkit.parse(config.config_path.read_text(encoding="utf-8"))
    table = doc.setdefault("cloud", tomlkit.table())
    table["url"] = config.cloud.url
    try:
        atomic_rewrite(config.config_path, tomlkit.dumps(doc).encode("utf-8"))
    except OSError as exc:
        target = config.config_path.resolve()
        return PacsEdgeError(
            f"restored, but the cloud URL could not be recorded in {target}:"
            f" {exc.strerror}", hint=f"set [cloud] url = \"{_shown(config.cloud.url)}\" in"
            f" {target} (as its owner) before the sync agent starts")
    return None
