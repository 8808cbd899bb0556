"""WADO-RS metadata (PS3.18 10.4.1.1.2): DICOM JSON of a study, series or instance.

Series and study metadata come from the per-series gzip cache
(appliance/services/series_metadata.py): a client that accepts gzip (every
browser and `requests`) gets the cached file as it is, with
`Content-Encoding: gzip`; others get it inflated on the fly. A study's answer
is its series' arrays joined into one, streamed series by series. Bulk values
are BulkDataURIs under this request's scheme and host. Scope, recall and audit
are as for every WADO-RS read (dicomweb_wado.locate).
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from appliance.http import dicomweb_common as common
from appliance.http.dicomweb_media import CHUNK, DICOM_JSON, accepts_json, file_chunks
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
    found = await locate(request, "metadata")
    base = common.base_url(request)
    if "instance" in request.match_info:
        item = found.instances[0]
        url = instance_url(base, item.study_uid, item.series_uid, item.sop_uid)
        body = await asyncio.to_thread(instance_json, item.path, item.transfer_syntax, url)
        return common.json_response([body])
    files = await asyncio.to_thread(_series_files, common.metadata_cache(request),
                                    found.instances, base)
    response = web.StreamResponse(headers={"Content-Type": DICOM_JSON,
                                           "Vary": "Accept-Encoding"})
    gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "").lower()
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


def _series_files(cache: SeriesMetadataCache, instances: tuple[StoredInstance, ...],
                  base: str) -> list[Path]:
    """One cache file per series, in the order the series come from the index."""
    series: dict[str, list[StoredInstance]] = {}
    for item in instances:
        series.setdefault(item.series_uid, []).append(item)
    return [cache.series_file(uid, [(i.sop_uid, i.sha256, i.path, i.transfer_syntax)
                                    for i in members], base, members[0].study_uid)
            for uid, members in series.items()]


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
