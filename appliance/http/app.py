"""The web application: one aiohttp Application with every route module registered.

One origin serves everything (DESIGN.md "Workflow and web edges"): DICOMweb
under /dicom-web, the login page and launch links, and the viewer at /. Every
request passes the auth middleware (auth.py) first; the routes are thin and
call the services in `WebServices`, which decide scope and durability.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.http import auth, login
from appliance.services.ingest import IngestService
from appliance.services.retrieve import RetrieveService
from appliance.store.files import FileStore
from appliance.store.index import Index

SERVICES: web.AppKey[WebServices] = web.AppKey("pacs_edge_web_services")


@dataclass(frozen=True)
class WebServices:
    """What the routes may call; composed in appliance/process/serve.py."""

    config: Config
    users: auth.Authenticator
    index: Index
    files: FileStore
    ingest: IngestService
    retrieve: RetrieveService
    auditor: Auditor


def build_app(services: WebServices) -> web.Application:
    # Bodies the routes read whole (forms) stay small; STOW-RS streams its upload
    # and bounds it itself against [http] max_request_mb.
    app = web.Application(middlewares=[auth.middleware(services.users)],
                          client_max_size=1 << 20, handler_args=None)
    app[SERVICES] = services
    login.add_routes(app, services.users, auditor=services.auditor)  # type: ignore[arg-type]
    return app
