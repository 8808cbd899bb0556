"""The web application: one aiohttp Application with every route module registered.

One origin serves everything (DESIGN.md "Workflow and web edges"): DICOMweb
under /dicom-web, the login page and launch links, and the viewer at /. Every
request passes the auth middleware (auth.py) first; the routes are thin and
call the services in `WebServices` (web_context.py), which decide scope and
durability.
"""

from __future__ import annotations

from aiohttp import web

from appliance.base.config import MetricsConfig
from appliance.http import (
    auth,
    dicomweb_metadata,
    dicomweb_qido,
    dicomweb_stow,
    dicomweb_wado,
    login,
    ops_routes,
    response_headers,
    viewer,
)
from appliance.http.https_server import client_gone, head_timer
from appliance.http.web_context import METADATA, READS, SERVICES, WebServices
from appliance.services.box_health import HealthSources
from appliance.services.series_metadata import SeriesMetadataCache
from appliance.services.web_retrieve import WebRetrieveService

__all__ = ["WebServices", "build_app"]


def build_app(services: WebServices) -> web.Application:
    # Bodies the routes read whole (forms) stay small; STOW-RS streams its upload
    # and bounds it itself against [http] max_request_mb.
    app = web.Application(middlewares=[head_timer, ops_routes.count_requests, client_gone,
                                       auth.middleware(services.users)],
                          client_max_size=1 << 20)
    response_headers.install(app)
    app[SERVICES] = services
    app[READS] = WebRetrieveService(services.index, services.files, services.retrieve,
                                    recall_wait=services.config.http.recall_wait_seconds)
    app[METADATA] = SeriesMetadataCache(services.metadata_cache,
                                        max_bytes=services.config.http.metadata_cache_mb << 20)
    dicomweb_qido.add_routes(app)
    dicomweb_wado.add_routes(app)
    dicomweb_metadata.add_routes(app)
    dicomweb_stow.add_routes(app)
    login.add_routes(app, services.users, auditor=services.auditor)  # type: ignore[arg-type]
    ops_routes.add_routes(app, services.health, services.config.metrics, status_page=True)
    # Last: the viewer's single-page fallback answers every GET no other route took.
    viewer.add_routes(app, viewer.viewer_root(services.config.http.viewer_root,
                                              services.config.home),
                      box_name=services.config.dicom.ae_title)
    return app


def build_ops_app(sources: HealthSources, metrics: MetricsConfig) -> web.Application:
    """/metrics and the probes alone, for the listener of a box whose web server is off."""
    app = web.Application(middlewares=[head_timer, ops_routes.count_requests],
                          client_max_size=1 << 10)
    response_headers.install(app)
    ops_routes.add_routes(app, sources, metrics, status_page=False)
    return app
