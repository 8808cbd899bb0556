"""WADO-RS metadata (PS3.18 10.4.1.1.2): DICOM JSON of a study, series or instance.

Series and study metadata come from the per-series gzip cache
(appliance/services/series_metadata.py): a client that accepts gzip (every
browser and `requests`) gets the cached file as it is, with
`Content-Encoding: gzip`; others get it inflated on the fly. A study's answer
is its series' arrays joined into one, streamed series by series. Bulk values
are BulkDataURIs under this request's scheme and host. Scope, recall and audit
are as for every WADO-RS read (dicomweb_wado.locate), with one difference: series
and study metadata of an evicted study whose series are all in the cache are
answered from it at once, its recall asked for but not waited for. The viewer
then lays out the study (series, patient, slice counts) while the pixels come
back, and its frame requests wait for the recall. A series not in the cache
waits for the recall like any read.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from appliance.http import dicomweb_common as common
from appliance.http.dicomweb_media import (
    CHUNK,
    DICOM_JSON,
    accepts_gzip,
    accepts_json,
    file_chunks,
)
from appliance.http.dicomweb_wado import locate, stored_syntaxes
from appliance.services.series_metadata import (
    SeriesMetadataCache,
    instance_json,
    instance_url,
)
from appliance.services.web_retrieve import StoredInstance


def add_routes(app: web.Application) -> None:
    p = f"{common.PREFIX}/studies/{{study}}"
    common.add_get(app, f"{p}/metadata", metadata)
    common.add_get(app, f"{p}/series/{{series}}/metadata", metadata)
    common.add_get(app, f"{p}/series/{{series}}/instances/{{instance}}/metadata", metadata)


async def metadata(request: web.Request) -> web.StreamResponse:
    await stored_syntaxes(request, "metadata")  # 404 before 406: a 406 must not reveal a study
    if not accepts_json(request.headers.get("Accept")):
        raise common.not_acceptable("metadata")
    base = common.base_url(request)
    if "instance" in request.match_info:  # one file's header, never cached
        item = (await locate(request, "metadata")).instances[0]
        url = instance_url(base, item.study_uid, item.series_uid, item.sop_uid)
        body = await asyncio.to_thread(instance_json, item.path, item.transfer_syntax, url)
        return common.json_response([body])
    files = await _series_files_of(request, base)
    response = web.StreamResponse(headers={"Content-Type": DICOM_JSON,
                                           "Vary": "Accept-Encoding"})
    gzip_ok = accepts_gzip(request.headers.get("Accept-Encoding"))
    if len(files) == 1 and gzip_ok:
        response.headers["Content-Encoding"] = "gzip"
        response.content_length = (await asyncio.to_thread(files[0].stat)).st_size
        await response.prepare(request)
        async for chunk in file_chunks(files[0]):
            await response.write(chunk)
    else:
        await response.prepare(request)
        await response.write(b"[")
        first = True
        for path in files:
            async for inner in _array_items(path):
                if not first and inner:
                    await response.write(b",")
                first = first and not inner
                await response.write(inner)
        await response.write(b"]")
    await response.write_eof()
    return response


async def _series_files_of(request: web.Request, base: str) -> list[Path]:
    """The cache file of each series the request names: built from the files on disk,
    or, for an evicted study, the cached ones if every series has one (the recall is
    asked for, not waited for); otherwise the recall is waited for (locate)."""
    cache = common.metadata_cache(request)
    found = await locate(request, "metadata", wait=0.0, pending_ok=True)
    if found.unavailable:  # evicted, its recall now asked for
        files = await asyncio.to_thread(_cached_files, cache, found.unavailable, base)
        if files is not None:
            user, address = common.who(request)
            await asyncio.to_thread(
                common.services(request).auditor.web_retrieved, user, address,
                what="metadata", study_uids=[common.uid(request, "study")],
                instances=len(found.unavailable))
            return files
        found = await locate(request, "metadata")  # waits for the recall
    return await asyncio.to_thread(_series_files, cache, found.instances, base)


def _series_files(cache: SeriesMetadataCache, instances: tuple[StoredInstance, ...],
                  base: str) -> list[Path]:
    """One cache file per series, in the order the series come from the index."""
    series: dict[str, list[StoredInstance]] = {}
    for item in instances:
        series.setdefault(item.series_uid, []).append(item)
    return [cache.series_file(uid, [(i.sop_uid, i.sha256, i.path, i.transfer_syntax)
                                    for i in members], base, members[0].study_uid)
            for uid, members in series.items()]


def _cached_files(cache: SeriesMetadataCache, instances: tuple[StoredInstance, ...],
                  base: str) -> list[Path] | None:
    """The cached file of each series, in index order; None unless all are cached."""
    series: dict[str, list[tuple[str, str]]] = {}
    for item in instances:
        series.setdefault(item.series_uid, []).append((item.sop_uid, item.sha256))
    files = []
    for uid, members in series.items():
        cached = cache.cached_file(uid, members, base)
        if cached is None:
            return None
        files.append(cached)
    return files


async def _array_items(path: Path) -> AsyncIterator[bytes]:
    """The inflated content of a cached JSON array without its brackets, in pieces."""
    text = await asyncio.to_thread(_inflate, path)
    inner = text[1:-1]
    for start in range(0, len(inner), CHUNK):
        yield inner[start:start + CHUNK]


def _inflate(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, zlib.error, EOFError) as exc:
        raise web.HTTPInternalServerError(text="cached metadata is unreadable\n") from exc
