"""What the web routes may call, and where they find it on the application.

`WebServices` is composed in appliance/process/serve.py and handed to
`build_app` (app.py); routes reach it, and the services built from it, through
the typed application keys below (never through module globals).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.http.auth import Authenticator
from appliance.services.box_health import HealthSources
from appliance.services.ingest import IngestService
from appliance.services.retrieve import RetrieveService
from appliance.services.series_metadata import SeriesMetadataCache
from appliance.services.web_retrieve import WebRetrieveService
from appliance.store.files import FileStore
from appliance.store.index import Index


@dataclass(frozen=True)
class WebServices:
    config: Config
    users: Authenticator
    index: Index
    files: FileStore
    ingest: IngestService
    retrieve: RetrieveService
    auditor: Auditor
    health: HealthSources

    @property
    def metadata_cache(self) -> Path:
        return self.config.home / "cache" / "metadata"


SERVICES: web.AppKey[WebServices] = web.AppKey("pacs_edge_web_services")
READS: web.AppKey[WebRetrieveService] = web.AppKey("pacs_edge_web_reads")
METADATA: web.AppKey[SeriesMetadataCache] = web.AppKey("pacs_edge_series_metadata")
