"""QIDO-RS pages with `offset` and `limit` answer each match once, even while the index grows.

Pages are cut from the matches in the order the index recorded them. In the
order of SQLite's plan, an instance of a study still arriving, recorded between
two page requests, slid into a page already answered: the next page repeated
that page's last match and the new instance was never answered. Both are seen
here through the service on a real index, as the edge calls it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from pydicom.dataset import Dataset

from appliance.services.access import Principal, Role
from appliance.services.web_query import WebQueryService
from appliance.store.index import Index, StoredFile
from appliance.store.instance_header import InstanceHeader

pytestmark = pytest.mark.asyncio

ROOT = "1.2.826.0.1.3680043.10.4714"
RADIOLOGIST = Principal("rad", Role.RADIOLOGIST, "")
FILES = iter(range(1_000_000))


def header(study: int, series: int, instance: int, *, name: str = "DOE^JOHN",
           referring: str = "WELBY^MARCUS") -> InstanceHeader:
    study_uid = f"{ROOT}.{study}"
    return InstanceHeader(
        patient_id=f"P{study:05d}", issuer_of_patient_id="", patient_name=name,
        birth_date="19700101", sex="F", study_uid=study_uid, study_date="20240301",
        study_time="1015", accession_number=f"ACC{study:06d}", study_id=str(study),
        study_description="", referring_physician=referring, character_set="ISO_IR 192",
        series_uid=f"{study_uid}.{series}", modality="CT", series_number=series,
        series_description="", body_part="", series_date="", series_time="",
        sop_uid=f"{study_uid}.{series}.{instance}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=instance, transfer_syntax="1.2.840.10008.1.2.1")


async def record(index: Index, h: InstanceHeader) -> None:
    n = next(FILES)
    await index.record_instance(h, StoredFile(f"{n}.dcm", 1000, 0, str(n), 0.0))


@pytest_asyncio.fixture
async def index(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Index]:
    async with Index(tmp_path_factory.mktemp("paging") / "index.sqlite3") as index:
        yield index


def query(level: str, **keys: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "PatientName"):
        setattr(identifier, keyword, "")
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return identifier


async def page(index: Index, identifier: Dataset, offset: int, limit: int, *,
               principal: Principal = RADIOLOGIST) -> list[str]:
    """The SOP Instance UIDs of an IMAGE page, the Study Instance UIDs of a STUDY page."""
    found = await WebQueryService(index, max_results=5000).search(
        principal, identifier, offset=offset, limit=limit)
    uid = "SOPInstanceUID" if identifier.QueryRetrieveLevel == "IMAGE" else "StudyInstanceUID"
    return [str(match[uid].value) for match in found.identifiers()]


def uids(headers: Iterator[InstanceHeader] | list[InstanceHeader]) -> list[str]:
    return [h.sop_uid for h in headers]


async def test_pages_one_after_another_answer_each_match_once_in_the_order_recorded(
        index: Index) -> None:
    # Recorded across studies and series, so that the order recorded is not the order
    # of any index the plan walks (series by study, instances by series).
    recorded = [header(study, series, instance,
                       referring="OTHER^DOCTOR" if study == 2 else "WELBY^MARCUS")
                for instance in range(3) for series in (2, 1) for study in (3, 1, 2)]
    for h in recorded:
        await record(index, h)
    everything = query("IMAGE")
    pages = [await page(index, everything, offset, 4) for offset in range(0, 20, 4)]
    assert [uid for each in pages for uid in each] == uids(recorded)
    within = query("IMAGE", StudyInstanceUID=f"{ROOT}.1")
    assert [uid for offset in range(0, 8, 3) for uid in await page(index, within, offset, 3)
            ] == uids(h for h in recorded if h.study_uid == f"{ROOT}.1")
    doctor = Principal("doc", Role.REFERRING, "WELBY^MARCUS")
    assert [uid for offset in range(0, 20, 5)
            for uid in await page(index, everything, offset, 5, principal=doctor)
            ] == uids(h for h in recorded if h.referring_physician == "WELBY^MARCUS")


async def test_an_instance_recorded_between_two_pages_lands_on_a_later_page(
        index: Index) -> None:
    study = f"{ROOT}.1"
    first = [header(1, series, instance) for series in (1, 2) for instance in range(3)]
    for h in first:
        await record(index, h)
    instances = query("IMAGE", StudyInstanceUID=study)
    answered = await page(index, instances, 0, 4)
    assert answered == uids(first[:4])
    late = header(1, 1, 9)  # the study is still arriving: its first series grows
    await record(index, late)
    answered += await page(index, instances, 4, 4)
    assert answered == uids([*first, late])


async def test_a_study_recorded_between_two_pages_lands_on_a_later_page(index: Index) -> None:
    for n, name in enumerate(("DOE^ANNA", "DOE^MARY", "DOE^NORA", "DOE^OLGA")):
        await record(index, header(n, 1, 1, name=name))
    studies = query("STUDY", PatientName="DOE*")
    answered = await page(index, studies, 0, 2)
    await record(index, header(9, 1, 1, name="DOE^BELLA"))  # the name index puts it 2nd
    answered += await page(index, studies, 2, 10)
    assert answered == [f"{ROOT}.{n}" for n in (0, 1, 2, 3, 9)]
