"""QIDO-RS: C-FIND's matching over HTTPS, paging, and the referring physician's scope.

One real `pacs-edge serve` with HTTPS for the module, six studies of three
patients stored with storescu. A radiologist sees them all; a referring user
sees only the studies whose Referring Physician's Name is theirs, and every
other study answers 404 through QIDO, WADO, metadata and frames.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
import webpeer
from conftest import EdgeServer

STUDY_UID = "0020000D"
ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    return dicomgen.make_studies(tmp_path_factory.mktemp("qido-data"), seed=91, patients=3,
                                 studies_per_patient=2, series_per_study=2,
                                 instances_per_series=1)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory,
        studies: list[dicomgen.GeneratedInstance]) -> Iterator[EdgeServer]:
    with webpeer.running_web_server(tmp_path_factory.mktemp("qido")) as server:
        dcmtk.storescu(server.port, [i.path for i in studies]).check()
        yield server


def _study_uids(answer: list[dict]) -> set[str]:
    return {item[STUDY_UID]["Value"][0] for item in answer}


def _by_study(instances: list[dicomgen.GeneratedInstance]
              ) -> dict[str, list[dicomgen.GeneratedInstance]]:
    return dicomgen.group_by(instances, "StudyInstanceUID")


def test_search_for_studies_matches_like_cfind(
        web: EdgeServer, studies: list[dicomgen.GeneratedInstance]) -> None:
    client = webpeer.dicomweb(web, "rad")
    everything = client.search_for_studies()
    assert _study_uids(everything) == set(_by_study(studies))
    patient = str(studies[0].header.PatientID)
    expected = {i.study_uid for i in studies if str(i.header.PatientID) == patient}
    assert _study_uids(client.search_for_studies(search_filters={"PatientID": patient})) == (
        expected)
    family = str(studies[0].header.PatientName).split("^")[0]
    wildcard = client.search_for_studies(search_filters={"PatientName": f"{family[:3]}*"})
    assert expected <= _study_uids(wildcard)
    dates = sorted(str(i.header.StudyDate) for i in studies)
    ranged = client.search_for_studies(search_filters={"StudyDate": f"{dates[0]}-{dates[0]}"})
    assert _study_uids(ranged) == {i.study_uid for i in studies
                                   if str(i.header.StudyDate) == dates[0]}
    uids = sorted(_by_study(studies))[:2]
    listed = client.search_for_studies(search_filters={"StudyInstanceUID": ",".join(uids)})
    assert _study_uids(listed) == set(uids)
    first = everything[0]
    assert first["00080061"]["vr"] == "CS"  # ModalitiesInStudy among the defaults
    assert first["00100010"]["vr"] == "PN"
    assert "00080052" not in first  # QueryRetrieveLevel is C-FIND's, not QIDO's


def test_series_and_instances_levels(web: EdgeServer,
                                     studies: list[dicomgen.GeneratedInstance]) -> None:
    client = webpeer.dicomweb(web, "rad")
    study_uid = studies[0].study_uid
    series = client.search_for_series(study_uid)
    expected = {str(i.header.SeriesInstanceUID) for i in studies if i.study_uid == study_uid}
    assert {s["0020000E"]["Value"][0] for s in series} == expected
    ct = client.search_for_series(search_filters={"Modality": "CT"})
    assert {s["00080060"]["Value"][0] for s in ct} == {"CT"}
    instances = client.search_for_instances(study_uid)
    assert {i["00080018"]["Value"][0] for i in instances} == {
        i.sop_instance_uid for i in studies if i.study_uid == study_uid}
    everywhere = client.search_for_instances()
    assert len(everywhere) == len(studies)


def test_every_match_carries_its_retrieve_url_at_every_level(
        web: EdgeServer, studies: list[dicomgen.GeneratedInstance]) -> None:
    """PS3.18 Table 10.6.3-3: Retrieve URL (0008,1190) of each match, a WADO-RS URL."""
    http = webpeer.session(web, "rad")
    root = f"{webpeer.base_url(web)}/dicom-web"
    one = studies[0]
    study = f"{root}/studies/{one.study_uid}"
    series = f"{study}/series/{one.header.SeriesInstanceUID}"
    expected = {f"{root}/studies": {f"{root}/studies/{uid}" for uid in _by_study(studies)},
                f"{study}/series": {f"{study}/series/{i.header.SeriesInstanceUID}"
                                    for i in studies if i.study_uid == one.study_uid},
                f"{series}/instances": {
                    f"{series}/instances/{i.sop_instance_uid}" for i in studies
                    if i.header.SeriesInstanceUID == one.header.SeriesInstanceUID},
                f"{root}/instances": {f"{root}/studies/{i.study_uid}/series/"
                                      f"{i.header.SeriesInstanceUID}/instances/"
                                      f"{i.sop_instance_uid}" for i in studies}}
    for url, urls in expected.items():
        found = http.get(url, params={"includefield": "StudyDescription"}).json()
        assert {m["00081190"]["Value"][0] for m in found} == urls, url
        assert all(m["00081190"]["vr"] == "UR" for m in found)
    answer = http.get(next(iter(expected[f"{series}/instances"])),
                      headers={"Accept": 'multipart/related; type="application/dicom"; '
                                         "transfer-syntax=*"})
    assert answer.status_code == 200


def test_includefield_limit_offset_and_fuzzymatching(
        web: EdgeServer, studies: list[dicomgen.GeneratedInstance]) -> None:
    http = webpeer.session(web, "rad")
    url = f"{webpeer.base_url(web)}/dicom-web/studies"
    total = len(_by_study(studies))
    pages = [http.get(url, params={"limit": 4, "offset": offset}) for offset in (0, 4)]
    assert [len(p.json()) for p in pages] == [4, total - 4]
    assert "more results" in pages[0].headers["Warning"]
    assert "Warning" not in pages[1].headers
    assert _study_uids(pages[0].json()) | _study_uids(pages[1].json()) == set(
        _by_study(studies))
    extra = http.get(url, params={"includefield": "00081030,BodyPartExamined"}).json()
    assert all("00081030" in item for item in extra)
    fuzzy = http.get(url, params={"fuzzymatching": "true"})
    assert fuzzy.status_code == 200
    assert "fuzzymatching" in fuzzy.headers["Warning"]


def test_malformed_queries_are_400(web: EdgeServer) -> None:
    # `%C2%B2` is "²": a digit to str.isdigit(), not to int(); it was a 500 with a traceback.
    for query in ("NoSuchKeyword=1", "limit=-1", "offset=x", "StudyDate=2020-01-01",
                  "00081115=x", "includefield=NotAnAttribute", "limit=%C2%B2",
                  "offset=%C2%B2", "StudyTime=%C2%B2", "StudyTime=10.%C2%B2"):
        answer = webpeer.curl(web, f"/dicom-web/studies?{query}", user="rad")
        assert answer.status == 400, query
    assert webpeer.curl(web, "/dicom-web/series?SeriesTime=%C2%B2", user="rad").status == 400
    assert "Traceback" not in web.log()
    assert webpeer.curl(web, "/dicom-web/studies/1.2.x/series", user="rad").status == 400
    wrong = webpeer.curl(web, "/dicom-web/studies", user="rad",
                         headers={"Accept": "application/dicom+xml"})
    assert wrong.status == 406


def test_an_offset_of_any_size_passes_every_match_and_a_repeated_limit_or_offset_is_400(
        web: EdgeServer) -> None:
    """An offset of 10 digits or more was 400 "must be a non-negative integer" (so was a
    limit: see the qido_max_results test); a second limit or offset was ignored for the
    first, where a repeated attribute key is 400."""
    for digits in (20, 5000):  # 5000: past int()'s 4300-digit limit
        answer = webpeer.curl(web, f"/dicom-web/studies?offset={'9' * digits}", user="rad")
        assert (answer.status, answer.body) == (200, b"[]"), digits
    for query in ("limit=1&limit=5", "offset=0&offset=3", "limit=1&offset=0&limit=1"):
        answer = webpeer.curl(web, f"/dicom-web/studies?{query}", user="rad")
        assert answer.status == 400, query
        assert b"more than once" in answer.body
    assert "Traceback" not in web.log()


def test_query_values_that_are_not_numbers_for_numeric_attributes_are_400(
        web: EdgeServer) -> None:
    for path in ("/dicom-web/studies?NumberOfStudyRelatedInstances=x",
                 "/dicom-web/instances?InstanceNumber=abc",
                 "/dicom-web/studies?PatientWeight=heavy"):
        answer = webpeer.curl(web, path, user="rad")
        assert answer.status == 400, (path, answer.status)
    assert "Traceback" not in web.log()


def test_referring_physician_sees_only_their_studies_everywhere(
        web: EdgeServer, studies: list[dicomgen.GeneratedInstance]) -> None:
    by_study = _by_study(studies)
    physician = str(studies[0].header.ReferringPhysicianName)
    mine = {uid for uid, items in by_study.items()
            if str(items[0].header.ReferringPhysicianName) == physician}
    others = set(by_study) - mine
    assert mine and others, "the generated studies must have more than one physician"
    webpeer.add_user(web, "doc", "referring", referring=physician.lower() + "^")
    client = webpeer.dicomweb(web, "doc")
    assert _study_uids(client.search_for_studies()) == mine
    assert {i[STUDY_UID]["Value"][0] for i in client.search_for_instances()} == mine
    assert {s[STUDY_UID]["Value"][0] for s in client.search_for_series()} == mine
    http = webpeer.session(web, "doc")
    base = webpeer.base_url(web)
    for uid in others:
        item = by_study[uid][0]
        instance = (f"{base}/dicom-web/studies/{uid}/series/{item.header.SeriesInstanceUID}"
                    f"/instances/{item.sop_instance_uid}")
        assert http.get(f"{base}/dicom-web/studies/{uid}/series").json() == []
        for url, accept in ((f"{base}/dicom-web/studies/{uid}", ANY),
                            (f"{base}/dicom-web/studies/{uid}/metadata", "*/*"),
                            (f"{instance}/frames/1", "*/*"),
                            (f"{instance}/bulkdata/7FE00010", "*/*"),
                            # a media type the box cannot answer: still 404, not 406
                            (f"{base}/dicom-web/studies/{uid}", "image/png"),
                            (f"{base}/dicom-web/studies/{uid}/metadata", "image/png")):
            assert http.get(url, headers={"Accept": accept}).status_code == 404, url
    own = sorted(mine)[0]
    assert http.get(f"{base}/dicom-web/studies/{own}", headers={"Accept": ANY}
                    ).status_code == 200


def test_qido_is_audited_with_user_and_address(web: EdgeServer) -> None:
    webpeer.dicomweb(web, "rad").search_for_studies(search_filters={"AccessionNumber": "A9*"})
    line = webpeer.audit_line(web, '"QIDO-RS"', "web user rad")
    assert "127.0.0.1" in line


def test_an_answer_holds_at_most_qido_max_results_and_pages_on_with_offset(
        tmp_path_factory: pytest.TempPathFactory,
        studies: list[dicomgen.GeneratedInstance]) -> None:
    """A search of every instance without a limit, or with a larger one, is a page of
    [http] qido_max_results with Warning: 299; offsets page through all of them, for a
    scoped user too (the scope is applied before the page is cut)."""
    sop_uid = "00080018"
    with webpeer.running_web_server(tmp_path_factory.mktemp("qido-max"),
                                    qido_max_results=4) as server:
        dcmtk.storescu(server.port, [i.path for i in studies]).check()
        http = webpeer.session(server, "rad")
        url = f"{webpeer.base_url(server)}/dicom-web/instances"
        pages = [http.get(url, params={"offset": offset}) for offset in range(0, 12, 4)]
        assert [len(p.json()) for p in pages] == [4, 4, 4]
        assert ["Warning" in p.headers for p in pages] == [True, True, False]
        assert "more results" in pages[0].headers["Warning"]
        assert len(http.get(url, params={"limit": 100}).json()) == 4
        huge = http.get(url, params={"limit": "9" * 20})  # was 400: more than 9 digits
        assert len(huge.json()) == 4
        assert "more results" in huge.headers["Warning"]
        assert {i[sop_uid]["Value"][0] for p in pages for i in p.json()} == {
            i.sop_instance_uid for i in studies}

        physician = str(studies[0].header.ReferringPhysicianName)
        mine = {i.sop_instance_uid for i in studies
                if str(i.header.ReferringPhysicianName) == physician}
        webpeer.add_user(server, "doc", "referring", referring=physician)
        doc = webpeer.session(server, "doc")
        seen = [i[sop_uid]["Value"][0] for offset in range(len(mine) + 1)
                for i in doc.get(url, params={"offset": offset, "limit": 1}).json()]
    assert sorted(seen) == sorted(mine)


@pytest.mark.parametrize(("stored", "typed"), [("NFC", "NFD"), ("NFD", "NFC")])
def test_a_referring_name_typed_in_the_other_unicode_form_still_sees_its_study(
        tmp_path: Path, stored: str, typed: str) -> None:
    """Person-name matching folds names to NFC (store/person_names.fold); the scope
    compared them case-folded only, so a user set up with 'müller^hans' composed saw
    nothing of the studies a RIS referred as 'Müller^Hans' decomposed (or the reverse)."""
    instance = dicomgen.make_non_ascii_instance(tmp_path / "data")
    ds = pydicom.dcmread(instance.path)
    ds.ReferringPhysicianName = unicodedata.normalize(stored, "Müller^Hans")
    ds.save_as(instance.path)
    with webpeer.running_web_server(tmp_path) as server:
        dcmtk.storescu(server.port, [instance.path]).check()
        webpeer.add_user(server, "doc", "referring",
                         referring=unicodedata.normalize(typed, "müller^hans"))
        found = webpeer.dicomweb(server, "doc").search_for_studies()
    assert _study_uids(found) == {instance.study_uid}


def test_a_comma_separated_modality_list_matches_studies_with_any_of_them(
        web: EdgeServer, studies: list[dicomgen.GeneratedInstance]) -> None:
    # OHIF's study list sends the modalities ticked in its filter as one comma-separated
    # value; a code string holds no comma, so "CT,US" was a value no study had: ticking
    # a second modality emptied the list.
    http = webpeer.session(web, "rad")
    url = f"{webpeer.base_url(web)}/dicom-web/studies?limit=101&offset=0&ModalitiesInStudy="
    every = set(_by_study(studies))  # each study is CT\MR
    assert _study_uids(http.get(url + "CT%2CUS").json()) == every
    assert _study_uids(http.get(url + "US%2CMR").json()) == every
    assert _study_uids(http.get(url + "US%5CMR").json()) == every  # backslash, as C-FIND
    assert http.get(url + "US%2CNM").json() == []
    names = f"{webpeer.base_url(web)}/dicom-web/studies?PatientName="
    family, given = str(studies[0].header.PatientName).split("^")
    assert http.get(names + f"{family},{given}").json() == []  # in a name, a comma is text
