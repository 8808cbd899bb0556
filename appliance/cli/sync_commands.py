"""Commands of the sync agent: `sync`, `evict`, `recall`, `scrub`.

The command line is the composition root, so it is the one appliance module
that may reach into the sync package; the serving process never does (it
asks for recalls through the index, see sync.recall).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from appliance.base.errors import PacsEdgeError
from appliance.base.human import human_size
from appliance.base.logsetup import setup_logging
from appliance.base.metrics_dir import use_metrics_dir
from appliance.cli.common import (
    count_bar,
    err,
    expected_errors,
    home_option,
    load,
    out,
)

MAX_STABLE_AFTER = 366 * 86400  # seconds: a longer wait is "never", not an override


def _reject_nan(ctx: click.Context, param: click.Parameter, value: float | None
                ) -> float | None:
    """click's FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("nan is not a number")
    return value


@click.command()
@home_option
@click.option("--once", is_flag=True, help="One replicate-and-evict pass, then exit.")
@click.option("--stable-after", type=click.FloatRange(0, MAX_STABLE_AFTER), default=None,
              callback=_reject_nan, metavar="SECONDS",
              help="Override [sync] stable_after_seconds for this pass (0 to a year).")
@expected_errors
def sync(home: Path | None, once: bool, stable_after: float | None) -> None:
    """Run the sync agent (replicate, evict, lifecycle, recall) until SIGTERM."""
    if stable_after is not None and not once:
        raise click.UsageError("--stable-after applies to one pass: use it with --once"
                               " (the agent reads [sync] stable_after_seconds)")
    config = load(home)
    use_metrics_dir(config.home)  # before the agent's modules load prometheus-client

    from sync.agent import run_agent, sync_pass
    from sync.context import open_context
    from sync.rollback import sweep_leftover_files

    setup_logging(config.log.level)
    if not once:
        asyncio.run(run_agent(config))
        return

    async def one_pass() -> Any:
        async with open_context(config) as ctx:
            await sweep_leftover_files(ctx)
            with count_bar("replicating studies") as progress:
                return await sync_pass(ctx, stable_after=stable_after, on_progress=progress)

    report = asyncio.run(one_pass())
    sent = sum(r.bytes for r in report.replicated)
    out.print(f"replicated {len(report.replicated)} study version(s) ({human_size(sent)}), "
              f"evicted {report.evicted} ({human_size(report.bytes_freed)} freed), "
              f"failures {len(report.failures)}")
    for failure in report.failures:
        err.print(f"  {failure}", highlight=False)
    if report.failures:
        raise SystemExit(1)


@click.command()
@home_option
@click.argument("study_uid")
@click.option("--without-escrow", is_flag=True,
              help="Evict even though the current site key is not escrowed: if this box is "
              "lost, the study is lost with it ([sync] evict_without_escrow, for this once).")
@expected_errors
def evict(home: Path | None, study_uid: str, without_escrow: bool) -> None:
    """Delete a replicated study's local files (its verified packs stay in the cloud).

    Refused until the current site key is escrowed (`pacs-edge keys escrow`)."""
    import dataclasses

    from sync.context import open_context
    from sync.evict import evict_study

    config = load(home)
    if without_escrow:
        config = dataclasses.replace(
            config, sync=dataclasses.replace(config.sync, evict_without_escrow=True))

    async def run() -> int:
        async with open_context(config) as ctx:
            return await evict_study(ctx, await _study(ctx, study_uid))

    freed = asyncio.run(run())
    out.print(f"evicted; {human_size(freed)} freed")


@click.command()
@home_option
@click.argument("study_uid")
@expected_errors
def recall(home: Path | None, study_uid: str) -> None:
    """Bring an evicted study back from the cloud, verified."""
    config = load(home)
    use_metrics_dir(config.home)

    from sync.context import open_context
    from sync.recall import recall_study

    async def run() -> int:
        async with open_context(config) as ctx:
            study = await _study(ctx, study_uid)
            with count_bar("recalling") as progress:
                return await recall_study(ctx, study, on_progress=progress)

    count = asyncio.run(run())
    out.print(f"recalled {count} instance(s)")


@click.command()
@home_option
@click.option("--all", "everything", is_flag=True,
              help="Read back every pack in use (the default).")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              callback=_reject_nan, metavar="F",
              help="Read back only the least recently checked F of the packs (0 < F <= 1).")
@expected_errors
def scrub(home: Path | None, everything: bool, fraction: float | None) -> None:
    """Read packs back from the cloud and authenticate every byte; exit 1 if any is damaged.

    A damaged pack of a study still on local disk is uploaded again as a new
    version by the next sync pass; one whose instances exist only in the cloud
    marks its study at risk (status, audit log; evict refuses it).
    """
    from sync.context import open_context
    from sync.scrub import scrub_packs, select_packs

    if everything and fraction is not None:
        raise click.UsageError("--all and --fraction exclude each other")
    config = load(home)

    async def run() -> Any:
        async with open_context(config) as ctx:
            packs = await select_packs(ctx, fraction=fraction)
            with Progress(TextColumn("scrubbing"), BarColumn(), DownloadColumn(),
                          TimeRemainingColumn(), console=err, transient=True,
                          disable=not err.is_terminal) as progress:
                task = progress.add_task("scrub", total=sum(p.pack_size for p in packs))
                return await scrub_packs(ctx, packs,
                                         on_bytes=lambda n: progress.advance(task, n))

    report = asyncio.run(run())
    for damaged in report.damaged:
        out.print(f"damaged {damaged.pack_name}: {damaged.reason}; {damaged.outcome()}",
                  highlight=False, markup=False)
    for name, why in report.skipped:
        out.print(f"skipped {name}: {why}", highlight=False, markup=False)
    for name, why in report.wrong_key:
        out.print(f"not opened {name}: {why}", highlight=False, markup=False)
    out.print(f"scrubbed {report.ok + len(report.damaged)} pack(s) "
              f"({human_size(report.bytes_read)} read): ok {report.ok}, damaged "
              f"{len(report.damaged)}, skipped {len(report.skipped)}", highlight=False)
    if report.wrong_key:
        err.print(f"error: {len(report.wrong_key)} pack(s) are wrapped for a site key this"
                  " box does not hold; nothing was marked damaged", highlight=False,
                  markup=False)
        err.print("hint: check that secrets/site.key is this box's own site key"
                  " (docs/operator-guide.md, \"Restore a lost box\")", highlight=False,
                  markup=False)
    if report.damaged or report.wrong_key:
        raise SystemExit(1)


async def _study(ctx: Any, study_uid: str) -> Any:
    from appliance.store.study_rows import study_by_uid

    study = await study_by_uid(ctx.index, study_uid)
    if study is None:
        raise PacsEdgeError("no study with that Study Instance UID in the index",
                            hint="find its Study Instance UID with findscu (-k StudyInstanceUID)")
    return study
