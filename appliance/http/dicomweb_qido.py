"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

The query string becomes a C-FIND identifier and WebQueryService answers it
with the C-FIND matcher (same wildcards, ranges and UID lists as DIMSE), scoped
to the user, then paged. Supported parameters:

- `{attributeID}={value}`: a keyword (PatientID) or tag (00100020); several
  values (any of which matches, as in C-FIND) separated by backslashes, and for UIDs
  and code strings by commas too: OHIF's study list sends the
  modalities ticked in its filter as `ModalitiesInStudy=CT,MR`. A comma is never
  part of a UI or CS value; in other values (a name typed "SMITH, JOHN") it is
  text. Repeated keys are refused (400);
- `includefield={attributeID}[,...]` (repeatable) or `includefield=all`;
- `limit`, `offset` (non-negative integers of any length, each given once: a
  `limit` above `[http] qido_max_results` is that many, with the Warning of a cut
  page; an `offset` past the last match answers `[]`);
- `fuzzymatching=true` is not supported: matching stays exact and a
  `Warning: 299` header says so (PS3.18 8.3.4.4).

Answers are application/dicom+json (200 with `[]` when nothing matches); an
identifier C-FIND would refuse is 400. Every match carries its Retrieve URL
(0008,1190), which PS3.18 Table 10.6.3-3 requires of a retrievable one: the
study, series or instance's WADO-RS URL, under this request's scheme and host
as STOW-RS RetrieveURLs and BulkDataURIs are. Each search is audited (who, from
where, the query), and so is each refused one, with its reason, whether the
query string cannot be read (an unknown key, a bad UID in the path) or C-FIND
refuses the identifier made of it: every refusal is a QueryError, whose message
names the parameter at fault, never its value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

from aiohttp import web
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from appliance.base.errors import QueryError, QueryRefusal
from appliance.base.uids import is_valid_uid
from appliance.http import dicomweb_common as common
from appliance.http.dicomweb_media import accepts_json
from appliance.services.web_query import Page, WebQueryService

_STUDY_KEYS = (
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber",
    "InstanceAvailability", "ModalitiesInStudy", "ReferringPhysicianName", "PatientName",
    "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
_SERIES_KEYS = (
    "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "SeriesDate",
    "SeriesTime", "BodyPartExamined", "NumberOfSeriesRelatedInstances", "StudyInstanceUID",
)
_INSTANCE_KEYS = (
    "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "BitsAllocated",
    "NumberOfFrames",
)
_RESERVED = {"includefield", "limit", "offset", "fuzzymatching"}
_COMMA_LISTS = frozenset({"UI", "CS"})  # VRs whose character set has no comma
_LEVEL_TAG = Tag(0x0008, 0x0052)
_RETRIEVE_URL = "00081190"
# The WADO-RS path of a match at each level: (resource, tag of its UID in the match's JSON).
_URL_PATH = {
    "STUDY": (("studies", "0020000D"),),
    "SERIES": (("studies", "0020000D"), ("series", "0020000E")),
    "IMAGE": (("studies", "0020000D"), ("series", "0020000E"), ("instances", "00080018")),
}
_WARN_FUZZY = '299 pacs-edge "fuzzymatching is not supported: matching is exact"'
_WARN_MORE = '299 pacs-edge "there are more results: ask with a larger offset"'
# A limit or offset of more digits is this: more than any index holds.
_COUNT_DIGITS = 18
_COUNT_CAP = 10**_COUNT_DIGITS


def add_routes(app: web.Application) -> None:
    p = common.PREFIX
    common.add_get(app, f"{p}/studies", studies)
    common.add_get(app, f"{p}/series", series)
    common.add_get(app, f"{p}/instances", instances)
    common.add_get(app, f"{p}/studies/{{study}}/series", series)
    common.add_get(app, f"{p}/studies/{{study}}/instances", instances)
    common.add_get(app, f"{p}/studies/{{study}}/series/{{series}}/instances", instances)


async def studies(request: web.Request) -> web.Response:
    return await _search(request, "STUDY", _STUDY_KEYS)


async def series(request: web.Request) -> web.Response:
    defaults = _SERIES_KEYS if "study" in request.match_info else _STUDY_KEYS + _SERIES_KEYS
    return await _search(request, "SERIES", defaults)


async def instances(request: web.Request) -> web.Response:
    defaults = (_INSTANCE_KEYS if "study" in request.match_info
                else _STUDY_KEYS + _SERIES_KEYS + _INSTANCE_KEYS)
    return await _search(request, "IMAGE", defaults)


async def _search(request: web.Request, level: str, defaults: Iterable[str]) -> web.Response:
    if not accepts_json(request.headers.get("Accept")):
        raise common.not_acceptable("a search")
    service = common.services(request)
    user, address = common.who(request)
    study = ""  # the refusal of a bad study UID names no study
    query = WebQueryService(service.index, max_results=service.config.http.qido_max_results,
                            retrieve_ae_title=service.config.dicom.ae_title)
    try:
        study = _uid(request, "study") if "study" in request.match_info else ""
        identifier = _identifier(request, level, defaults)
        offset = _count(request, "offset", 0)
        limit = _count(request, "limit", None)
        page = await query.search(common.principal(request), identifier, offset=offset,
                                  limit=limit)
    except QueryError as exc:
        await asyncio.to_thread(service.auditor.web_queried, user, address, level=level,
                                query=request.query_string, matches=None, reason=exc.message,
                                study_uid=study)
        raise web.HTTPBadRequest(text=f"{exc.message}\n") from exc
    await asyncio.to_thread(service.auditor.web_queried, user, address, level=level,
                            query=request.query_string, matches=len(page),
                            study_uid=study)
    warnings = []
    if request.query.get("fuzzymatching", "").lower() == "true":
        warnings.append(_WARN_FUZZY)
    if page.truncated:
        warnings.append(_WARN_MORE)
    headers = {"Warning": ", ".join(warnings)} if warnings else None
    return common.json_array_response(json_texts(page, common.base_url(request)),
                                      headers=headers)


def json_texts(page: Page, base: str) -> Iterator[str]:
    """Each match as DICOM JSON text, its Dataset made and dropped in turn, with its
    Retrieve URL under `base` (scheme://host). The URL is
    added to the JSON, not the Dataset: a DataElement would cost ~10% more per row."""
    path = _URL_PATH[page.found.level.name]
    root = f"{base}{common.PREFIX}"
    for match in page.identifiers():
        if _LEVEL_TAG in match:
            del match[_LEVEL_TAG]
        found = match.to_json_dict()
        url = root + "".join(f"/{name}/{found[tag]['Value'][0]}" for name, tag in path)
        found[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
        yield common.json_text(found)


def _identifier(request: web.Request, level: str, defaults: Iterable[str]) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in defaults:
        _set(identifier, Tag(tag_for_keyword(keyword)), "")
    fields = [f for value in request.query.getall("includefield", [])
              for f in value.split(",") if f.strip()]
    if any(f.strip().lower() == "all" for f in fields):
        fields = []  # every key the index knows is among the defaults of the level
    for name in fields:
        tag = _tag(name.strip())
        if tag not in identifier:
            _set(identifier, tag, "")
    seen: set[str] = set()
    for key, value in request.query.items():
        if key in _RESERVED:
            continue
        if key in seen:
            raise QueryError(QueryRefusal.NOT_IN_MODEL, "a query key is given more than once")
        seen.add(key)
        _set(identifier, _tag(key), value)
    for name, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
        if name in request.match_info:
            _set(identifier, Tag(tag_for_keyword(keyword)), _uid(request, name))
    return identifier


def _uid(request: web.Request, name: str) -> str:
    """A UID path parameter (common.uid, refused as a query)."""
    value = request.match_info.get(name, "")
    if not is_valid_uid(value):
        raise QueryError(QueryRefusal.NOT_IN_MODEL, f"{name} is not a valid UID")
    return value


def _tag(name: str) -> BaseTag:
    """A keyword or an 8-digit hex tag; refused for anything else (sequence paths too)."""
    found = tag_for_keyword(name)
    if found is None and len(name) == 8:
        try:
            found = int(name, 16)
        except ValueError:
            found = None
    if found is None or keyword_for_tag(found) == "":
        raise QueryError(QueryRefusal.NOT_IN_MODEL,
                         "a query key is not a DICOM attribute keyword or tag")
    return Tag(found)


def _set(identifier: Dataset, tag: BaseTag, value: str) -> None:
    vr = dictionary_VR(tag).split(" ")[0]
    if vr == "SQ":
        raise QueryError(QueryRefusal.NOT_IN_MODEL, "sequence attributes cannot be query keys")
    text: object = value
    if vr in _COMMA_LISTS and value:
        text = [v for v in value.replace("\\", ",").split(",") if v]
    elif "\\" in value:
        text = value.split("\\")
    # Values are the user's (maybe PHI): no pydicom validation warning may quote them.
    try:
        identifier[tag] = DataElement(tag, vr, text, validation_mode=config.IGNORE)
    except (ValueError, TypeError, OverflowError) as exc:  # "x" for an IS key, say
        raise QueryError(QueryRefusal.MALFORMED_KEY,
                         "a query value does not fit its attribute") from exc


def _count(request: web.Request, name: str, default: int | None) -> int | None:
    """`limit` or `offset`: digits of any length (a count past _COUNT_CAP is _COUNT_CAP:
    a limit is capped at qido_max_results anyway, an offset that large passes over every
    match), given once."""
    given = request.query.getall(name, [])
    if len(given) > 1:
        raise QueryError(QueryRefusal.NOT_IN_MODEL, f"{name} is given more than once")
    raw = given[0] if given else ""
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise QueryError(QueryRefusal.MALFORMED_KEY, f"{name} must be a non-negative integer")
    # Not int() of every length: past 4300 digits it raises (CPython's limit).
    return int(raw) if len(raw) <= _COUNT_DIGITS else _COUNT_CAP
