"""`pacs-edge migrate verify`: after a run, every migrated study is checked against the
legacy PACS instance by instance; what the box lacks is reopened and fetched.

The case of a cut-over weekend: the old PACS still receives while the migration
runs, so a study migrated on Saturday may have one more instance on Sunday. The
run says done; verify says which study lacks what, `resume --retry-failed` fetches
it, and a second verify proves the box complete, byte-identical to the archive.
dcmqrscp is the legacy PACS (tests/legacypacs.py); C-GET, so no server runs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pydicom
from conftest import EdgeServer
from legacypacs import LegacyPacs
from test_migrate import (
    RUN_TIMEOUT,
    SYNTAX_BY_CLASS,
    box_digests,
    dataset_digest,
    legacy_factory,  # noqa: F401  (a fixture)
    make_archive,
)


def verify(box: EdgeServer) -> tuple[int, dict[str, object]]:
    result = box.cli("migrate", "verify", "--json", check=False, timeout=RUN_TIMEOUT)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout)


def migrated_by_get(files: list[Path], until: str,
                    edge_server_factory: Callable[..., EdgeServer],
                    make_legacy: Callable[..., LegacyPacs]) -> tuple[EdgeServer, LegacyPacs]:
    """A box that migrated `files` from a legacy PACS with C-GET, days 20240301..`until`."""
    box = edge_server_factory(start=False)
    legacy = make_legacy(files)
    box.add_peer("legacy", legacy.ae_title, legacy.port, allow="find,get")
    box.cli("migrate", "start", "--from", "legacy", "--via", "get", "--since", "20240301",
            "--until", until, timeout=RUN_TIMEOUT)
    return box, legacy


def arrive_late(legacy: LegacyPacs, like: Path, folder: Path) -> tuple[pydicom.Dataset, Path]:
    """A new instance of `like`'s series that reaches the legacy PACS after the run."""
    late = pydicom.dcmread(like)
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = dicomgen.make_uid(9, "late")
    path = dicomgen.write_instance(late, folder / "late.dcm",
                                   SYNTAX_BY_CLASS[str(late.SOPClassUID)]).path
    legacy.load([path])
    return late, path


def test_verify_finds_an_instance_the_legacy_pacs_received_after_the_run_and_resume_fetches_it(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    files = make_archive(tmp_path / "archive", 3, busy_day_studies=0)
    box, legacy = migrated_by_get(files, "20240303", edge_server_factory, legacy_factory)
    code, report = verify(box)
    assert (code, report["checked"], report["complete"], report["missing"]) == (0, 3, 3, 0)

    late, path = arrive_late(legacy, files[0], tmp_path)
    code, report = verify(box)
    assert (code, report["complete"], report["missing"]) == (1, 2, 1)
    assert [s["study_uid"] for s in report["incomplete"]] == [str(late.StudyInstanceUID)]
    [failure] = json.loads(box.cli("migrate", "failures", "--json").stdout)
    assert failure["error_kind"] == "incomplete"
    assert failure["last_error"].startswith("verify: 1 of ")

    box.cli("migrate", "resume", "--retry-failed", timeout=RUN_TIMEOUT)
    code, report = verify(box)
    assert (code, report["complete"], report["missing"]) == (0, 3, 0)
    assert box_digests(box.home) == Counter(dataset_digest(f.read_bytes())
                                            for f in [*files, path])
    trail = (box.home / "audit" / "audit.log").read_text(encoding="utf-8")
    assert "migration run 1 verified: 3 studies checked, 2 complete, 1 incomplete" in trail


def test_verify_again_before_the_retry_does_not_call_the_run_complete(
        tmp_path: Path, edge_server_factory: Callable[..., EdgeServer],
        legacy_factory: Callable[..., LegacyPacs]) -> None:  # noqa: F811
    """An incomplete study is a failure of the run, no longer a done one: a second verify
    (a script's --json after the operator's look) checked only the done studies and
    said complete, exit 0, while the box still lacked an instance."""
    files = make_archive(tmp_path / "archive", 2, busy_day_studies=0)
    box, legacy = migrated_by_get(files, "20240302", edge_server_factory, legacy_factory)
    arrive_late(legacy, files[0], tmp_path)
    code, report = verify(box)
    assert (code, len(report["incomplete"])) == (1, 1)
    studies = report["checked"]
    again = box.cli("migrate", "verify", check=False, timeout=RUN_TIMEOUT)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "the run is not complete: 1 studies failed or wait" in again.stderr
    code, report = verify(box)
    assert (code, report["checked"], report["not_migrated"]) == (1, studies - 1, 1)

    box.cli("migrate", "resume", "--retry-failed", timeout=RUN_TIMEOUT)
    code, report = verify(box)
    assert (code, report["checked"], report["not_migrated"], report["missing"]) == (
        0, studies, 0, 0)
