"""What every DICOMweb route shares: UIDs from the URL, the user, JSON answers, errors.

UIDs in a URL are checked before anything else (digits and dots, at most 64
characters: appliance.base.uids): a bad one is 400, so no other text from a
URL ever reaches the index, let alone the file system (files are found only
through the index). Error bodies are short, fixed texts: no UID, no PHI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.typedefs import Handler

from appliance.base.uids import is_valid_uid
from appliance.http.auth import PRINCIPAL, client_address
from appliance.http.web_context import METADATA, READS, SERVICES, WebServices
from appliance.services.access import Principal
from appliance.services.series_metadata import SeriesMetadataCache
from appliance.services.web_retrieve import WebRetrieveService

PREFIX = "/dicom-web"


def add_get(app: web.Application, path: str, handler: Handler) -> None:
    """A GET route whose HEAD is 405. aiohttp would answer HEAD with the GET handler,
    which reads, audits and streams the whole answer (a study, a series' metadata)
    only for aiohttp to drop the body; PS3.18 defines no HEAD for DICOMweb, so it is
    refused rather than made cheap. The HEAD route is explicit: without it, HEAD
    would fall through to the viewer's catch-all and be a misleading 404."""
    app.router.add_get(path, handler, allow_head=False)
    app.router.add_route("HEAD", path, _head_refused)


async def _head_refused(request: web.Request) -> NoReturn:
    """405, its Allow naming what every route of the path takes (POST on /studies too)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        allowed |= (await resource.resolve(request))[1]
    raise web.HTTPMethodNotAllowed("HEAD", sorted(allowed - {"HEAD"}),
                                   text="HEAD is not supported: use GET\n")


def services(request: web.Request) -> WebServices:
    return request.app[SERVICES]


def reads(request: web.Request) -> WebRetrieveService:
    return request.app[READS]


def metadata_cache(request: web.Request) -> SeriesMetadataCache:
    return request.app[METADATA]


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def who(request: web.Request) -> tuple[Principal, str]:
    """(user, client address) for the audit trail (it names the user and their role)."""
    return principal(request), client_address(request)


def uid(request: web.Request, name: str) -> str:
    """A UID path parameter; 400 unless it is a valid UID."""
    value = request.match_info.get(name, "")
    if not is_valid_uid(value):
        raise web.HTTPBadRequest(text=f"{name} is not a valid UID\n")
    return value


def not_found() -> web.HTTPNotFound:
    # Same answer for "no such study" and "not yours to see" (DESIGN.md).
    return web.HTTPNotFound(text="no such study, series or instance\n")


def not_acceptable(what: str) -> web.HTTPNotAcceptable:
    return web.HTTPNotAcceptable(text=f"none of the accepted media types can be answered"
                                      f" for {what}\n")


def json_text(value: Any) -> str:
    """Compact JSON; never NaN or Infinity (not JSON: a browser's JSON.parse refuses the
    whole answer), a ValueError instead, a 500 rather than a broken answer."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(status=status, body=json_text(body).encode(),
                        content_type="application/dicom+json", headers=headers)


def json_array_response(items: Iterable[str], *, headers: dict[str, str] | None = None
                        ) -> web.Response:
    """A JSON array of `items` (each already JSON text), joined as they come: the objects
    they were made from need not all live at once."""
    return web.Response(body=f"[{','.join(items)}]".encode(),
                        content_type="application/dicom+json", headers=headers)


def base_url(request: web.Request) -> str:
    """scheme://host of this request: the base of Retrieve and BulkData URIs (behind a
    reverse proxy, the proxy must pass the Host header: docs/web.md)."""
    return f"{request.scheme}://{request.host}"
