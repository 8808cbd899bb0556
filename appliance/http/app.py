"""The web application: one aiohttp Application with every route module registered.

One origin serves everything (DESIGN.md "Workflow and web edges"): DICOMweb
under /dicom-web, the login page and launch links, and the viewer at /. Every
request passes the auth middleware (auth.py) first; the routes are thin and
call the services in `WebServices` (web_context.py), which decide scope and
durability.
"""

from __future__ import annotations

from aiohttp import web

from appliance.http import (
    auth,
    dicomweb_metadata,
    dicomweb_qido,
    dicomweb_stow,
    dicomweb_wado,
    login,
    viewer,
)
from appliance.http.web_context import METADATA, READS, SERVICES, WebServices
from appliance.services.series_metadata import SeriesMetadataCache
from appliance.services.web_retrieve import WebRetrieveService

__all__ = ["WebServices", "build_app"]


def build_app(services: WebServices) -> web.Application:
    # Bodies the routes read whole (forms) stay small; STOW-RS streams its upload
    # and bounds it itself against [http] max_request_mb.
    app = web.Application(middlewares=[auth.middleware(services.users)],
                          client_max_size=1 << 20)
    app[SERVICES] = services
    app[READS] = WebRetrieveService(services.index, services.files, services.retrieve,
                                    recall_timeout=services.config.sync.recall_timeout_seconds)
    app[METADATA] = SeriesMetadataCache(services.metadata_cache)
    dicomweb_qido.add_routes(app)
    dicomweb_wado.add_routes(app)
    dicomweb_metadata.add_routes(app)
    dicomweb_stow.add_routes(app)
    login.add_routes(app, services.users, auditor=services.auditor)  # type: ignore[arg-type]
    # Last: the viewer's single-page fallback answers every GET no other route took.
    viewer.add_routes(app, viewer.viewer_root(services.config.http.viewer_root,
                                              services.config.home),
                      box_name=services.config.dicom.ae_title)
    return app
