"""`pacs-edge migrate verify`: check the latest run's migrated studies against the legacy
PACS, instance by instance (appliance/services/migration_verify.py).

Exit 0 when the box holds every instance the legacy PACS lists for every study the
run migrated and the run has no other study left; 1 when some are missing (they are
then failures of the run, which `migrate resume --retry-failed` fetches) or the run
holds studies or days that failed or wait (verify cannot check those); 2 when it
cannot check (no run, a run a process still drives, the peer gone from the
allowlist, the legacy PACS unreachable). The result is audited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.base.errors import MigrationError
from appliance.base.logsetup import setup_logging
from appliance.cli.common import audit_change, err, expected_errors, home_option, load, out
from appliance.services.migration_verify import VerifyReport, verify_run
from appliance.store import database
from appliance.store import migration_rows as rows
from appliance.store.index import Index


@click.command("verify")
@home_option
@click.option("--json", "as_json", is_flag=True)
@expected_errors
def verify(home: Path | None, as_json: bool) -> None:
    """Check that the box holds every instance the legacy PACS lists for each migrated
    study (one image-level C-FIND per study); reopen the studies that lack some."""
    config = load(home)
    setup_logging(config.log.level)
    run_id, report = asyncio.run(_verify(config))
    audit_change(config, f"migration run {run_id} verified: {report.checked} studies checked,"
                 f" {report.complete} complete, {len(report.incomplete)} incomplete"
                 f" ({report.missing} instances missing), {len(report.gone)} no longer"
                 f" listed by the legacy PACS, {report.not_migrated} studies and"
                 f" {report.days_not_listed} days of the run not migrated", security=False)
    if as_json:
        click.echo(json.dumps({"run": run_id, **dataclasses.asdict(report),
                               "missing": report.missing}, indent=2))
    else:
        out.print(f"migration run {run_id}: {report.checked} studies checked, {report.complete}"
                  f" complete, {len(report.incomplete)} incomplete ({report.missing} of"
                  f" {report.listed} instances missing), {len(report.gone)} no longer listed"
                  " by the legacy PACS", highlight=False)
    if report.incomplete:
        err.print("incomplete studies are failures of the run now: `pacs-edge migrate"
                  " failures` lists them; `pacs-edge migrate resume --retry-failed` fetches"
                  " what is missing", highlight=False)
    if report.not_migrated or report.days_not_listed:
        err.print(f"the run is not complete: {report.not_migrated} studies failed or wait and"
                  f" {report.days_not_listed} days are not listed (not checked: only migrated"
                  " studies can be); `pacs-edge migrate failures` lists the failed ones,"
                  " `pacs-edge migrate resume --retry-failed` tries them again", highlight=False)
    if not report.run_complete:
        sys.exit(1)


async def _verify(config: Config) -> tuple[int, VerifyReport]:
    from appliance.cli.migrate_setup import (  # pynetdicom: only this command
        legacy_audit,
        legacy_finder,
    )

    async with Index(config.index.path) as index:
        run = await database.run_sync(index.reader, rows.latest_run)
        if run is None:
            raise MigrationError("no migration run yet", hint="pacs-edge migrate start --from NAME")
        if run.driver_pid is not None:
            raise MigrationError(f"migration run {run.id} is being driven by process"
                                 f" {run.driver_pid}", hint="verify once it has stopped")
        source = legacy_finder(config, run.settings)
        if not err.is_terminal:
            report = await verify_run(index, run.id, source)
        else:
            with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(),
                          console=err, transient=True) as progress:
                bar = progress.add_task("verify", total=None)
                report = await verify_run(
                    index, run.id, source,
                    on_study=lambda n, total: progress.update(bar, total=total, completed=n))
        with Auditor.for_home(config, process="migrate") as auditor:
            legacy_audit(config, run.settings, auditor).verified(studies=report.checked,
                                                                 instances=report.listed)
        return run.id, report
