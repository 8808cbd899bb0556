"""What every DICOMweb route shares: UIDs from the URL, the user, JSON answers, errors.

UIDs in a URL are checked before anything else (digits and dots, at most 64
characters: appliance.base.uids): a bad one is 400, so no other text from a
URL ever reaches the index, let alone the file system (files are found only
through the index). Error bodies are short, fixed texts: no UID, no PHI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from appliance.base.uids import is_valid_uid
from appliance.http.auth import PRINCIPAL, client_address
from appliance.http.web_context import METADATA, READS, SERVICES, WebServices
from appliance.services.access import Principal
from appliance.services.series_metadata import SeriesMetadataCache
from appliance.services.web_retrieve import WebRetrieveService

PREFIX = "/dicom-web"


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
    return json.dumps(value, separators=(",", ":"))


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
