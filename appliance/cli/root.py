"""The `pacs-edge` command line: parse, call a service, print the result.

Expected failures (PacsEdgeError) become a one-line message, the operator
hint and exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from appliance.audit import Auditor
from appliance.base.config import (
    CONFIG_FILE,
    PEERS_FILE,
    Config,
    render_config_toml,
)
from appliance.base.errors import ConfigError
from appliance.base.human import human_size, human_time
from appliance.base.logsetup import setup_logging
from appliance.base.metrics_dir import use_metrics_dir
from appliance.cli import admin_commands
from appliance.cli.common import (
    RootGroup,
    count_bar,
    err,
    expected_errors,
    home_option,
    load,
    out,
    refuse_root_in_a_users_home,
    resolve_home,
)
from appliance.process.stack_dump import dump_stacks_on_sigusr1
from appliance.process.undumpable import make_undumpable
from appliance.services import peer_changes
from appliance.services.launch_links import ensure_link_key
from appliance.services.launch_links import key_path as link_key_path
from appliance.services.peers import PEERS_HEADER, Allowlist, Peer, parse_permissions
from provisioning.certs import DEFAULT_CA_DAYS, DEFAULT_NODE_DAYS, check_lifetimes
from provisioning.home import init_home
from provisioning.site_secrets import create_site_secrets

# Command groups in modules of their own, imported when named (LazyGroup says why).
_LAZY = {
    "sync": "appliance.cli.sync_commands:sync",
    "evict": "appliance.cli.sync_commands:evict",
    "recall": "appliance.cli.sync_commands:recall",
    "scrub": "appliance.cli.sync_commands:scrub",
    "certs": "appliance.cli.admin_commands:certs",
    "keys": "appliance.cli.admin_commands:keys",
    "audit": "appliance.cli.audit_commands:audit",
    "readers": "appliance.cli.reader_commands:readers",
    "reader": "appliance.cli.reader_commands:reader",
    "restore": "appliance.cli.reader_commands:restore",
    "worklist": "appliance.cli.worklist_commands:worklist",
    "migrate": "appliance.cli.migrate_commands:migrate",
    "prefetch": "appliance.cli.prefetch_commands:prefetch",
    "users": "appliance.cli.users_commands:users",
    "link": "appliance.cli.users_commands:link",
    "logref": "appliance.cli.logref_command:logref",
}


@click.group(cls=RootGroup, lazy=_LAZY)
# The installed distribution's version (what pip installed, what a rollback put back),
# read from its metadata only when asked: not a constant a rebuilt wheel would not change.
@click.version_option(package_name="pacs-edge", prog_name="pacs-edge")
def main() -> None:
    """pacs-edge: an on-premises PACS edge appliance with encrypted cloud sync."""
    make_undumpable()  # before any key is read (appliance/process/undumpable.py says why)
    # The units' UMask=0077 for a command run by hand too: an index, a spool file or a
    # recalled study it makes holds PHI, and was group- and world-readable under a shell's
    # 022. Files meant for others (certificates, the config) are given their mode.
    os.umask(0o077)
    dump_stacks_on_sigusr1()


@main.command()
@home_option
@click.option("--ae-title", default=None, help="This box's AE title (default EDGE).")
@click.option("--dicom-port", type=int, default=None, help="DICOM port (default 11112).")
@click.option("--tls-port", type=int, default=None,
              help="DICOM TLS port (default 2762); 0 turns TLS off.")
@click.option("--hl7-port", type=int, default=None,
              help="HL7 MLLP port for RIS orders (default 2575); 0 turns it off.")
@click.option("--http-port", type=int, default=None,
              help="HTTPS port for DICOMweb and the viewer (default 8443); 0 turns it off.")
@click.option("--metrics-port", type=int, default=None,
              help="With the HTTPS server off: port of a plain listener for /metrics and the"
                   " health probes (default 9464); 0 turns it off.")
@click.option("--cloud", "cloud_url", default=None,
              help="Blob store for the sync agent: file:///PATH or azure://CONTAINER"
                   " (default: <home>/cloud).")
@click.option("--cert-days", type=int, default=DEFAULT_NODE_DAYS, show_default=True,
              help="Lifetime of the node certificate.")
@click.option("--ca-days", type=int, default=DEFAULT_CA_DAYS, show_default=True,
              help="Lifetime of the site CA.")
@admin_commands.san_option
@click.option("--force-new-keys", is_flag=True,
              help="Replace the site key and name secret (refused once packs are in the cloud).")
@expected_errors
def init(home: Path | None, ae_title: str | None, dicom_port: int | None,
         tls_port: int | None, hl7_port: int | None, http_port: int | None,
         metrics_port: int | None, cloud_url: str | None, cert_days: int, ca_days: int,
         sans: tuple[str, ...], force_new_keys: bool) -> None:
    """Create the data home: config, secrets, site CA and node certificate.

    Never overwrites anything (but --force-new-keys)."""
    resolved = resolve_home(home)
    refuse_root_in_a_users_home(resolved)
    overrides = {"dicom": {"ae_title": ae_title, "port": dicom_port, "tls_port": tls_port},
                 "hl7": {"port": hl7_port},
                 "http": {"port": http_port},
                 "metrics": {"port": metrics_port},
                 "cloud": {"url": cloud_url}}
    # Validate the overrides exactly as the config loader would.
    Config(home=resolved).with_overrides(**overrides)
    check_lifetimes(resolved, ca_days=ca_days, node_days=cert_days)
    report = init_home(
        resolved,
        config_file=CONFIG_FILE,
        config_text=render_config_toml(**overrides),
        extra_files={PEERS_FILE: PEERS_HEADER},
    )
    report.created += admin_commands.provision_on_init(
        resolved, force_new_keys=force_new_keys, cert_days=cert_days, ca_days=ca_days,
        sans=sans)
    report.created += [str(path) for path in create_site_secrets(resolved)]
    if ensure_link_key(resolved):
        report.created.append(str(link_key_path(resolved)))
    if report.changed:
        out.print(f"initialised data home {resolved}")
        for item in report.created:
            out.print(f"  created {item}", highlight=False)
    else:
        out.print(f"data home {resolved} already initialised; nothing changed")
        if ae_title or dicom_port:
            out.print(f"  (edit {resolved / CONFIG_FILE} to change the AE title or port)")


@main.command()
@home_option
@click.option("--dicom-port", type=int, default=None, help="Override [dicom] port.")
@click.option("--ae-title", default=None, help="Override [dicom] ae_title.")
@click.option("--http-port", type=int, default=None, help="Override [http] port.")
@expected_errors
def serve(home: Path | None, dicom_port: int | None, ae_title: str | None,
          http_port: int | None) -> None:
    """Run the DIMSE server until SIGTERM/SIGINT."""
    # SIGHUP (`systemctl reload`) would end the process until serve's handler is in
    # place, seconds away (imports, config): held back, it waits and serve acts on it
    # once ready (appliance/process/serve.py, workers.py unblock it).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    config = load(home).with_overrides(dicom={"port": dicom_port, "ae_title": ae_title},
                                       http={"port": http_port})
    if config.metrics.enabled:
        # Before the server's modules load prometheus-client (appliance/base/metrics_dir.py).
        use_metrics_dir(config.home)

    from appliance.process.serve import serve as run
    from appliance.process.workers import run_workers

    setup_logging(config.log.level)
    if config.dicom.workers > 1:
        run_workers(config)
    else:
        asyncio.run(run(config))


@main.group()
def peers() -> None:
    """The allowlist of remote AEs (read live by a running server)."""


@peers.command("add")
@home_option
@click.argument("name")
@click.option("--ae-title", required=True)
@click.option("--host", required=True)
@click.option("--port", type=int, default=0,
              help="Where the peer listens (required unless --allow is only hl7).")
@click.option("--allow", default="store,find,move,get", show_default=True,
              help="Comma-separated permissions: store, find, move, get, commit (Storage"
                   " Commitment), mpps, worklist, hl7 (may send HL7 orders from --host).")
@click.option("--bind-host", is_flag=True,
              help="Accept this AE title only from the addresses of --host.")
@click.option("--tls", "use_tls", is_flag=True,
              help="Send C-MOVE sub-operations to this peer over DICOM TLS.")
@click.option("--tls-only", is_flag=True,
              help="Refuse this peer on the plain port: it must call over TLS with the"
                   " certificate issued for NAME (pacs-edge certs issue NAME).")
@expected_errors
def peers_add(home: Path | None, name: str, ae_title: str, host: str, port: int,
              allow: str, bind_host: bool, use_tls: bool, tls_only: bool) -> None:
    """Allow a remote AE."""
    config = load(home)
    peer = Peer(name, ae_title, host, port, parse_permissions(allow), bind_host=bind_host,
                tls=use_tls, tls_only=tls_only)
    peer_changes.add_peer(config, peer, process="cli")
    allowed = ",".join(sorted(peer.allow))
    where = f"{host}:{port}" if port else host
    out.print(f"added peer {name} ({peer.ae_title} at {where}, allow {allowed});"
              " a running server picks it up at the next association", highlight=False)
    if tls_only and not config.dicom.tls_port:
        err.print(f"note: DICOM TLS is off on this box ([dicom] tls_port = 0): {name} is"
                  " TLS-only, so it cannot associate until TLS is on", highlight=False)


@peers.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def peers_list(home: Path | None, as_json: bool) -> None:
    """Show the allowlist."""
    listed = Allowlist(load(home).peers_path).peers()
    if as_json:
        click.echo(json.dumps([
            {"name": p.name, "ae_title": p.ae_title, "host": p.host, "port": p.port,
             "allow": sorted(p.allow), "bind_host": p.bind_host, "tls": p.tls,
             "tls_only": p.tls_only}
            for p in listed.values()
        ], indent=2))
        return
    table = Table("name", "AE title", "host", "port", "allow", "flags")
    for p in listed.values():
        table.add_row(p.name, p.ae_title, p.host, str(p.port), ",".join(sorted(p.allow)),
                      ",".join(p.flags))
    out.print(table if listed else "no peers: every association is rejected until one is added")


@peers.command("remove")
@home_option
@click.argument("name")
@expected_errors
def peers_remove(home: Path | None, name: str) -> None:
    """Remove a peer; a running server refuses it from the next association."""
    config = load(home)
    ae_title = peer_changes.remove_peer(config, name, process="cli")
    out.print(f"removed peer {name} ({ae_title})", highlight=False)
    try:
        Allowlist(config.peers_path).peers()
    except ConfigError as exc:
        err.print(f"warning: the allowlist still cannot be read, and serve admits no peer"
                  f" until it can: {exc.message}", highlight=False, markup=False)
        if exc.hint:
            err.print(f"hint: {exc.hint}", highlight=False, markup=False)


@main.command()
@home_option
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def status(home: Path | None, as_json: bool) -> None:
    """One screen: studies, disk, tiering, replication, certificates, and warnings."""
    from appliance.dropfolder.counts import drop_folder_counts
    from appliance.services.box_health import HealthReport, gather
    from appliance.store.index import Index
    from provisioning.escrow_state import ESCROW_HINT

    config = load(home)

    async def report() -> HealthReport:
        async with Index(config.index.path) as index:
            async def dropped() -> dict[str, int]:
                return dataclasses.asdict(await drop_folder_counts(config, index))

            return await gather(config, index, dropfolder=dropped)

    health = asyncio.run(report())
    for warning in health.warnings:  # on stderr in both forms: scripts see them too
        err.print(f"warning: {warning.message}", highlight=False, markup=False)
        if warning.code == "no_escrow":
            err.print(f"hint: eviction is refused until then; {ESCROW_HINT}",
                      highlight=False, markup=False)
    if as_json:
        click.echo(json.dumps(health.as_dict(config), indent=2))
        return
    out.print(_status_table(config, health))


def _status_table(config: Config, health: Any) -> Table:
    totals = health.totals
    table = Table(title=f"pacs-edge {config.dicom.ae_title}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("home", str(config.home)),
        ("patients / studies", f"{totals.patients} / {totals.studies}"),
        ("series / instances", f"{totals.series} / {totals.instances}"
         f" ({totals.versions} prior versions)"),
        ("on disk", human_size(totals.local_bytes)),
        ("disk", f"{health.disk.used_percent:.0f}% used, {human_size(health.disk.free_bytes)}"
         f" free of {human_size(health.disk.total_bytes)}"),
        ("inodes", health.inodes_line),
        ("tiering", ", ".join(f"{state} {count}" for state, count
                              in {"local": 0, **totals.tier_states}.items())),
        ("drop folder", ", ".join(f"{k} {v}" for k, v in health.dropfolder.items())),
        ("waiting to replicate", human_size(health.sync["bytes_waiting_to_replicate"])),
        ("recalls waiting", str(health.backlog.recalls_pending)),
        ("prefetch", f"{health.backlog.prefetch_waiting} priors waiting,"
                     f" {health.backlog.prefetch_failed} failed"),
        ("last sync pass", human_time(health.sync["last_successful_pass_at"])),
        ("last scrub", human_time(health.sync["last_scrub_at"])),
        ("studies at risk", str(health.sync["studies_at_risk"])),
        ("site key escrow", f"{health.escrow.escrowed_key_id} on {health.escrow.escrowed_at}"
         if health.escrow.ok else "MISSING (see the warning)"),
        *[(f"{cert.name} certificate", f"expires {human_time(cert.not_after)}")
          for cert in health.certificates],
        ("peer certificates", health.peer_certificates_line),
    ]
    if health.audit_forwarding is not None:
        rows.append(("audit to syslog", f"{health.audit_forwarding.backlog} records waiting"))
    for key, value in rows:
        table.add_row(key, value)
    for warning in health.warnings:
        table.add_row("[red]warning[/red]", f"[red]{escape(warning.message)}[/red]")
    return table


@main.command("import")
@home_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@expected_errors
def import_(home: Path | None, paths: tuple[Path, ...]) -> None:
    """Ingest DICOM files and folders (recursively) durably, like C-STORE."""
    from appliance.audit.audited_ingest import AuditedIngest
    from appliance.services.importer import expand_paths, import_files
    from appliance.services.ingest import IngestService
    from appliance.store.files import FileStore
    from appliance.store.index import Index
    from appliance.store.pairing import check_pairing

    config = load(home)
    unlisted: list[tuple[Path, str]] = []
    files = sorted(set(expand_paths(paths, unlisted)))

    async def run() -> Any:
        store = FileStore(config.store.path, reserve_bytes=config.store.reserve_bytes)
        store.create_folders()  # no sweep: serve may be receiving into the spool
        async with Index(config.index.path) as index:
            await check_pairing(index, store)
            with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=err, transient=True) as progress, \
                    Auditor.for_home(config, process="cli") as auditor:
                task = progress.add_task("import", total=len(files))
                service = IngestService(store, index,
                                        max_inflated=config.store.max_inflated_mb << 20)
                ingest = AuditedIngest(service, auditor, "import")
                return await import_files(ingest, files,
                                          on_progress=lambda _p: progress.advance(task))

    summary = asyncio.run(run())
    summary.rejected.extend((folder, f"folder cannot be listed ({reason}): its files were"
                                     " not imported") for folder, reason in unlisted)
    out.print(f"stored {summary.stored} ({human_size(summary.bytes)}), "
              f"already present {summary.duplicates}, new versions {summary.new_versions}, "
              f"rejected {len(summary.rejected)}", highlight=False)
    for path, reason in summary.rejected:
        err.print(f"  rejected {path}: {reason}", highlight=False)
    if summary.rejected:
        sys.exit(1)


@main.command()
@home_option
@click.option("--repair", is_flag=True, help="Adopt files that have no index row.")
@click.option("--content", is_flag=True,
              help="Also read every local file and check its content against the index"
                   " (as long as reading the whole store takes).")
@expected_errors
def fsck(home: Path | None, repair: bool, content: bool) -> None:
    """Check that the file store and the index agree.

    With --repair, also the rebuild of a lost index (after `restore`): the index is
    the one of this store from then on (appliance/store/pairing.py). With --content,
    also that each stored file still holds the bytes that were received."""
    from appliance.audit import Auditor
    from appliance.services.fsck import fsck as run_fsck
    from appliance.store.files import FileStore
    from appliance.store.index import Index
    from appliance.store.pairing import pair

    config = load(home)

    async def run(on_progress: Callable[[int, int], None], auditor: Auditor) -> Any:
        files = FileStore(config.store.path)
        async with Index(config.index.path) as index:
            report = await run_fsck(files, index, repair=repair, content=content,
                                    on_progress=on_progress,
                                    on_adopted=lambda header: auditor.imported("fsck", header))
            if repair:
                await pair(index, files)
            return report

    # Adopted files are audited as an import, one record per study (written at close).
    with count_bar("files read") as on_progress, \
            Auditor.for_home(config, process="cli") as auditor:
        report = asyncio.run(run(on_progress, auditor))
    for path in report.orphan_files:
        verb = "adopted" if path in report.adopted else "file without index row"
        out.print(f"{verb}: {path}", highlight=False)
    for path, reason in report.unreadable:
        out.print(f"unreadable, left in place: {path} ({reason})", highlight=False)
    for path in report.missing_files:
        out.print(f"index row without file: {path}", highlight=False)
    for path in report.damaged_files:
        out.print(f"file whose content differs from what was received: {path}",
                  highlight=False)
    if report.temp_files_removed:
        out.print(f"removed {report.temp_files_removed} temp file(s)")
    if report.clean:
        out.print("store and index are consistent")
    else:
        # --repair adopts files without rows; it mends neither a missing nor a damaged file.
        unadopted = set(report.orphan_files) - set(report.adopted)
        hint = " (run with --repair to adopt files without rows)" if unadopted and not repair \
            else ""
        out.print(f"[red]inconsistencies found[/red]{hint}")
        if report.damaged_files:
            err.print("hint: a damaged file is sent to workstations as it is now; the"
                      " operator guide's 'A damaged stored file' says how to bring back"
                      " its content", highlight=False)
        sys.exit(1)


@main.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("check")
@home_option
@click.option("--config-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check this config file alone (values, listeners), not the home's and"
                   " not the files it names: before it replaces pacs-edge.toml.")
@click.option("--peers-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check this peer allowlist alone, before it replaces peers.toml.")
@expected_errors
def config_check(home: Path | None, config_file: Path | None, peers_file: Path | None) -> None:
    """Validate the config file and every file it names (secrets, certificates, credentials)."""
    # TLS, cloud SDK: only this command
    from appliance.cli.config_check import check_files, check_home

    if config_file is not None or peers_file is not None:
        findings = check_files(resolve_home(home), config_file=config_file,
                               peers_file=peers_file)
        checked = ", ".join(str(p) for p in (config_file, peers_file) if p is not None)
    else:
        # As root in the service user's home it is refused, as every command is: its
        # checks of access (credentials, folders) would be root's, and opening a
        # local-folder cloud makes its folder, which would be root's.
        config = load(home)
        findings = check_home(config)
        checked = str(config.config_path)
    for finding in findings:
        if finding.ok and finding.warning:
            err.print(f"warn   {finding.what}: {finding.warning}", highlight=False,
                      markup=False)
            err.print(f"       hint: {finding.hint}", highlight=False, markup=False)
        elif finding.ok:
            out.print(f"ok     {finding.what}", highlight=False, markup=False)
        else:
            err.print(f"error  {finding.what}: {finding.problem}", highlight=False,
                      markup=False)
            if finding.hint:
                err.print(f"       hint: {finding.hint}", highlight=False, markup=False)
    if not all(f.ok for f in findings):
        raise click.exceptions.Exit(2)
    out.print(f"{checked}: ok", highlight=False)


