"""`pacs-edge prefetch`: prefetch a patient's priors now, and see or retry what is under way.

    pacs-edge prefetch --patient-id ID [--issuer I]   choose the priors now; the serving
                                                      process C-MOVEs remote ones, the
                                                      sync agent recalls evicted ones
    pacs-edge prefetch status [--json]                requests, their priors and states
    pacs-edge prefetch retry                          failed requests and priors again

The output holds patient IDs (the operator's own screen, as `worklist`);
nothing of it is logged, and `status` is a Query record in the audit trail
naming the operator and the patients and studies shown.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from appliance.base.metrics_dir import use_metrics_dir
from appliance.cli.common import audit_shown, expected_errors, home_option, load, out
from appliance.store import database
from appliance.store import prefetch_rows as rows
from appliance.store.index import Index
from appliance.store.order_rows import PatientKey
from appliance.store.prefetch_rows import PrefetchPrior, PrefetchRequest


def _when(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at else None


@click.group(invoke_without_command=True)
@home_option
@click.option("--patient-id", default=None, help="Prefetch this patient's priors now.")
@click.option("--issuer", default="", help="Issuer of Patient ID (default: none).")
@click.pass_context
@expected_errors
def prefetch(ctx: click.Context, home: Path | None, patient_id: str | None,
             issuer: str) -> None:
    """Prefetch of prior studies: new orders and tomorrow's worklist trigger it by
    themselves; --patient-id triggers it by hand."""
    if ctx.invoked_subcommand is not None:
        if patient_id is not None or issuer:
            raise click.UsageError(f"--patient-id and --issuer prefetch now: they do not go"
                                   f" with `prefetch {ctx.invoked_subcommand}`")
        return  # the subcommand reads the group's --home (_home)
    if not patient_id:
        raise click.UsageError("give --patient-id, or a command (status, retry)")
    config = load(home)
    # Priors already local finish here: count them where a scrape of /metrics adds them up.
    use_metrics_dir(config.home)
    from appliance.audit import Auditor
    from appliance.dimse.remote_archive import configured_archive
    from appliance.services.peers import Allowlist
    from appliance.services.prefetch import Planned, PrefetchService

    async def run(auditor: Auditor) -> Planned:
        async with Index(config.index.path) as index:
            service = PrefetchService(index, config.prefetch, archive=configured_archive(
                config, Allowlist(config.peers_path)), audit=auditor)
            request_id = await service.request_manual(PatientKey(patient_id, issuer))
            request = await database.run_sync(index.reader, rows.request_by_id, request_id)
            assert request is not None
            return await service.plan(request)

    with Auditor.for_home(config, process="cli") as auditor:
        planned = asyncio.run(run(auditor))
    out.print(f"prefetch request {planned.request_id}: {len(planned.priors)} prior(s)",
              highlight=False)
    for prior in planned.priors:
        out.print(f"  {prior.study_date or '?'} {','.join(prior.modalities) or '?'}"
                  f" {prior.study_uid} ({prior.source.value})", highlight=False)
    if planned.error:
        out.print(f"  remote archive not asked: {planned.error}", highlight=False)


def _home(ctx: click.Context, home: Path | None) -> Path | None:
    """The subcommand's --home, else the group's (`prefetch --home H status`)."""
    group_home: Path | None = ctx.parent.params.get("home") if ctx.parent else None
    if home is not None and group_home is not None and home != group_home:
        raise click.UsageError(f"two different --home: {group_home} and {home}")
    return home if home is not None else group_home


def _request_json(request: PrefetchRequest, priors: list[PrefetchPrior]) -> dict[str, Any]:
    return {
        "id": request.id, "patient_id": request.patient.patient_id,
        "issuer": request.patient.issuer, "trigger": request.trigger,
        "accession_number": request.accession_number, "state": request.state,
        "error_kind": request.error_kind, "error": request.error,
        "needed_at": _when(request.needed_at), "hold_until": _when(request.hold_until),
        "created_at": _when(request.created_at), "planned_at": _when(request.planned_at),
        "attempts": request.attempts, "retry_at": _when(request.retry_at),
        "priors": [{
            "study_uid": p.study_uid, "study_date": p.study_date,
            "modalities": list(p.modalities), "source": p.source, "state": p.state,
            "failure_kind": p.failure_kind, "error": p.error,
            "rehydrate_requested_at": _when(p.rehydrate_requested_at),
            "done_at": _when(p.done_at), "attempts": p.attempts, "retry_at": _when(p.retry_at),
            "in_time": None if request.needed_at is None or p.done_at is None
            else p.done_at <= request.needed_at,
        } for p in priors],
    }


@prefetch.command("status")
@home_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@expected_errors
def status(ctx: click.Context, home: Path | None, as_json: bool) -> None:
    """Prefetch requests, newest first, with each prior's state."""
    config = load(_home(ctx, home))

    async def read() -> list[dict[str, Any]]:
        async with Index(config.index.path) as index:
            def both(conn: Any) -> list[dict[str, Any]]:
                requests = rows.recent_requests(conn)
                priors = rows.priors_of(conn, [r.id for r in requests]) if requests else []
                return [_request_json(r, [p for p in priors if p.request_id == r.id])
                        for r in requests]

            return await database.run_sync(index.reader, both)

    listed = asyncio.run(read())
    audit_shown(config, "pacs-edge prefetch status", matches=len(listed),
                patients=[(r["patient_id"], "") for r in listed],
                study_uids=[p["study_uid"] for r in listed for p in r["priors"]])
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    if not listed:
        out.print("no prefetch requests")
        return
    counts: dict[str, int] = {}
    table = Table("request", "trigger", "patient", "needed at", "prior", "source", "state")
    for request in listed:
        patient = request["patient_id"] + (f" ({request['issuer']})" if request["issuer"]
                                           else "")
        state = request["state"] + (f": {request['error_kind']}" if request["error_kind"]
                                    else "") + _retry(request)
        table.add_row(str(request["id"]), request["trigger"], patient,
                      request["needed_at"] or "", "", "", state)
        for prior in request["priors"]:
            counts[prior["state"]] = counts.get(prior["state"], 0) + 1
            detail = prior["state"] + (f": {prior['failure_kind']}" if prior["failure_kind"]
                                       else "") + _retry(prior)
            table.add_row("", "", "", "", f"{prior['study_date'] or '?'} "
                          f"{','.join(prior['modalities']) or '?'}", prior["source"], detail)
    out.print(table)
    out.print(", ".join(f"{state} {counts.get(state, 0)}" for state in
                        ("pending", "recalling", "rehydrating", "moving", "done", "failed")),
              highlight=False)


def _retry(row: dict[str, Any]) -> str:
    """', retry N at TIME' for a failure whose automatic retry is due later."""
    return f", retry {row['attempts'] + 1} at {row['retry_at']}" if row["retry_at"] else ""


@prefetch.command("retry")
@home_option
@click.pass_context
@expected_errors
def retry(ctx: click.Context, home: Path | None) -> None:
    """Try failed requests and failed priors again (the serving process and the sync
    agent pick them up)."""
    config = load(_home(ctx, home))

    async def run() -> tuple[int, int]:
        async with Index(config.index.path) as index:
            assert index.writer is not None
            return await index.writer.submit_sync(rows.retry_failed)

    requests, priors = asyncio.run(run())
    out.print(f"retrying {requests} request(s) and {priors} prior(s)", highlight=False)
