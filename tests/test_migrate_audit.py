"""The audit trail of what `pacs-edge migrate` asks the legacy PACS (PS3.15 A.5.3).

The box audits every inbound C-FIND (Query) and C-MOVE (Instances Transferred);
a migration sends the same requests outbound, over a whole archive, and those
must be in the trail too: one Query record per listing (a day, or the studies
without a date), one Instances Transferred record per study transferred, with
this box the requestor and the legacy PACS the other side, never one per
instance (the instances are audited as they are stored).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from conftest import EdgeServer
from legacypacs import LegacyPacs
from test_migrate import (
    RUN_TIMEOUT,
    legacy_factory,  # noqa: F401  (a fixture)
    make_archive,
)

QUERY, TRANSFERRED = "110112", "110104"
SOURCE, DESTINATION = "110153", "110152"


def records(home: Path) -> list[dict[str, Any]]:
    path = home / "audit" / "audit.log"
    return [json.loads(line)["record"] for line in path.read_text().splitlines()]


def roles(record: dict[str, Any]) -> dict[str, tuple[bool, set[str]]]:
    """UserID -> (UserIsRequestor, role codes) of each active participant."""
    return {p["UserID"]: (p["UserIsRequestor"], {r["csd-code"] for r in p.get("RoleIDCode", ())})
            for p in record["ActiveParticipant"]}


def test_a_migration_audits_its_queries_per_listing_and_its_moves_per_study(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    files = make_archive(tmp_path / "archive", 3, busy_day_studies=0)
    studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 1})
    legacy = legacy_factory(files, box=box)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    result = box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
                     "20240303", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr

    trail = records(box.home)
    # The legacy PACS not the requestor: serve's records of the C-STOREs it received
    # from it (the moved instances, per study) are inbound.
    outbound = [r for r in trail if roles(r).get(legacy.ae_title, (True,))[0] is False]
    queries = [r for r in outbound if r["EventIdentification"]["EventID"]["csd-code"] == QUERY]
    moves = [r for r in outbound
             if r["EventIdentification"]["EventID"]["csd-code"] == TRANSFERRED]
    # Three days and the studies without a date: four listings, one record each.
    assert len(queries) == 4, queries
    for record in queries:
        assert roles(record)[legacy.ae_title] == (False, {DESTINATION}), record
        assert roles(record)[box.ae_title] == (True, {SOURCE}), record
        [query] = record["ParticipantObjectIdentification"]
        assert query["ParticipantObjectID"] == "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root FIND
    listed_days = {base64.b64decode(r["ParticipantObjectIdentification"][0]
                                    ["ParticipantObjectQuery"]) for r in queries}
    assert any(b"20240302" in q for q in listed_days), listed_days
    # One per study moved, naming the study, the legacy PACS the source.
    assert len(moves) == len(studies), moves
    moved = set()
    for record in moves:
        assert roles(record)[legacy.ae_title] == (False, {SOURCE}), record
        assert roles(record)[box.ae_title] == (True, {DESTINATION}), record
        assert record["EventIdentification"]["EventOutcomeDescription"].startswith(
            "C-MOVE: completed=4 failed=0"), record
        moved |= {o["ParticipantObjectID"] for o in record["ParticipantObjectIdentification"]
                  if o["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"}
    assert moved == studies


def test_migrate_verify_audits_its_queries_as_one_record(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """`migrate verify` sends one image-level C-FIND per migrated study: one Query record
    for all of them, with how many it sent and the instances they listed."""
    files = make_archive(tmp_path / "archive", 2, busy_day_studies=0)
    box = edge_server_factory()
    box.configure(migrate={"retry_base_seconds": 0.05, "max_attempts": 1})
    legacy = legacy_factory(files, box=box)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,move,store")
    box.cli("migrate", "start", "--from", "legacy", "--since", "20240301", "--until",
            "20240303", timeout=RUN_TIMEOUT)
    box.cli("migrate", "verify")

    [record] = [r for r in records(box.home)
                if r["EventIdentification"].get("EventOutcomeDescription") == "migration verify"]
    assert record["EventIdentification"]["EventID"]["csd-code"] == QUERY
    assert roles(record)[legacy.ae_title] == (False, {DESTINATION}), record
    assert roles(record)[box.ae_title] == (True, {SOURCE}), record
    [query] = record["ParticipantObjectIdentification"]
    details = {d["type"]: d["value"]
               for d in query.get("ParticipantObjectDetail", ())}
    assert details == {"Queries": "2", "Matches": str(len(files))}, query
    identifier = base64.b64decode(query["ParticipantObjectQuery"])
    assert b"IMAGE" in identifier, identifier
