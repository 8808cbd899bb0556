"""Commands of the sync agent: `sync`, `evict`, `recall`.

The command line is the composition root, so it is the one appliance module
that may reach into the sync package; the serving process never does (it
asks for recalls through the index, see sync.recall).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from appliance.cli_common import (
    err,
    expected_errors,
    home_option,
    human_size,
    load,
    out,
    setup_logging,
)
from appliance.errors import PacsEdgeError


@click.command()
@home_option
@click.option("--once", is_flag=True, help="One replicate-and-evict pass, then exit.")
@click.option("--stable-after", type=float, default=None,
              help="Override [sync] stable_after_seconds for this pass.")
@expected_errors
def sync(home: Path | None, once: bool, stable_after: float | None) -> None:
    """Run the sync agent (replicate, evict, lifecycle, recall) until SIGTERM."""
    from sync.agent import run_agent, sync_pass
    from sync.context import open_context
    from sync.rollback import sweep_leftover_files

    config = load(home)
    setup_logging(config.log.level)
    if not once:
        asyncio.run(run_agent(config))
        return

    async def one_pass() -> Any:
        async with open_context(config) as ctx:
            await sweep_leftover_files(ctx)
            return await sync_pass(ctx, stable_after=stable_after)

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
    from sync.context import open_context
    from sync.recall import recall_study

    config = load(home)

    async def run() -> int:
        async with open_context(config) as ctx:
            study = await _study(ctx, study_uid)
            with Progress(TextColumn("recalling"), BarColumn(), MofNCompleteColumn(),
                          console=err, transient=True) as progress:
                task = progress.add_task("recall", total=None)
                return await recall_study(
                    ctx, study,
                    on_progress=lambda done, total: progress.update(task, completed=done,
                                                                    total=total))

    count = asyncio.run(run())
    out.print(f"recalled {count} instance(s)")


async def _study(ctx: Any, study_uid: str) -> Any:
    from sync.records import study_by_uid

    study = await study_by_uid(ctx.index, study_uid)
    if study is None:
        raise PacsEdgeError("no study with that Study Instance UID in the index",
                            hint="find it with findscu or pacs-edge status")
    return study
