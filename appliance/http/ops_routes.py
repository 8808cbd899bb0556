"""Operations endpoints: /metrics, /healthz, /readyz, and the admin's /status page.

    GET /healthz   200 "ok": the process answers (systemd, load balancers)
    GET /readyz    200 "ready", or 503 with one line per reason: disk below the
                   reserve or out of inodes, a store that takes no file, an index
                   that takes no write, no DICOM port bound
    GET /metrics   Prometheus text format (base/metrics.py: events; services/
                   state_metrics.py: state, /readyz's checks), for addresses in [metrics] allow
                   only (403 otherwise); no PHI, no UIDs
    GET /status    the same facts as `pacs-edge status` and the last 50 studies
                   received, as plain HTML, for admins (a login like the viewer's)

The first three need no login: a Prometheus server or a load balancer has no
session. They reveal no patient data; /metrics is still limited to the
configured scrapers because counts of studies are the site's business.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Awaitable, Callable

from aiohttp import web

from appliance.base.config import MetricsConfig
from appliance.base.human import human_size, human_time
from appliance.base.metrics import CONTENT_TYPE, HTTP_REQUESTS, exposition
from appliance.http import auth
from appliance.services.box_health import HealthReport, HealthSources
from appliance.services.state_metrics import state_families
from appliance.store.health_reads import RecentStudy, recent_studies

HEALTHZ, READYZ, METRICS, STATUS = "/healthz", "/readyz", "/metrics", "/status"
_SOURCES: web.AppKey[HealthSources] = web.AppKey("pacs_edge_health_sources")
_METRICS: web.AppKey[MetricsConfig] = web.AppKey("pacs_edge_metrics_config")
_NO_STORE = {"Cache-Control": "no-store"}
_PROXIED = ("Forwarded", "X-Forwarded-For")  # what a reverse proxy adds to a request
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, sources: HealthSources, metrics: MetricsConfig, *,
               status_page: bool) -> None:
    """Register the probes and /metrics (anonymous) and, with `status_page`, /status."""
    app[_SOURCES] = sources
    app[_METRICS] = metrics
    app.router.add_get(HEALTHZ, healthz)
    app.router.add_get(READYZ, readyz)
    if metrics.enabled:
        app.router.add_get(METRICS, metrics_text)
    auth.allow_anonymous(app, HEALTHZ, READYZ, METRICS)
    if status_page:
        app.router.add_get(STATUS, status)


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n", headers=_NO_STORE)


async def readyz(request: web.Request) -> web.Response:
    verdict = await request.app[_SOURCES].readiness()
    if verdict.ready:
        return web.Response(text="ready\n", headers=_NO_STORE)
    return web.Response(status=503, text="".join(f"{p}\n" for p in verdict.problems),
                        headers=_NO_STORE)


async def metrics_text(request: web.Request) -> web.Response:
    if not auth.address_in(auth.client_address(request), request.app[_METRICS].allow):
        raise web.HTTPForbidden(text="not a configured metrics scraper ([metrics] allow)\n")
    if any(name in request.headers for name in _PROXIED):
        # Through a reverse proxy on the box every client comes from loopback, which the
        # default allow admits: a scraper asks the box itself (docs/web.md).
        raise web.HTTPForbidden(text="/metrics is not served through a proxy: scrape the"
                                " box itself\n")
    sources = request.app[_SOURCES]
    # /readyz's checks too: a box that answers scrapes but takes no study (a read-only
    # store, a locked index) must show in Prometheus, which does not probe /readyz.
    report, ready = await asyncio.gather(sources.report(), sources.readiness())
    return web.Response(body=exposition(state_families(report, ready)),
                        headers={"Content-Type": CONTENT_TYPE, **_NO_STORE})


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by area and status class (no path, no UID in a label)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        HTTP_REQUESTS.labels(_area(request.path), f"{status // 100}xx").inc()


def _area(path: str) -> str:
    if path.startswith("/dicom-web"):
        return "dicomweb"
    if path in (HEALTHZ, READYZ, METRICS, STATUS):
        return "ops"
    if path in ("/login", "/logout", "/launch"):
        return "login"
    return "viewer"


async def status(request: web.Request) -> web.Response:
    principal = request[auth.PRINCIPAL]
    if not principal.may_administer():
        raise web.HTTPForbidden(text="the status page is for admins\n")
    sources = request.app[_SOURCES]
    report = await sources.report()
    recent = await recent_studies(sources.index, 50)
    return web.Response(text=_status_page(sources, report, recent), content_type="text/html",
                        charset="utf-8",
                        headers={**_NO_STORE, "Content-Security-Policy": "default-src 'none';"
                                 " style-src 'unsafe-inline'", "X-Frame-Options": "DENY"})


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in pairs)


def _status_page(sources: HealthSources, report: HealthReport,
                 recent: list[RecentStudy]) -> str:
    config = sources.config
    totals = report.totals
    facts = [
        ("box", config.dicom.ae_title),
        ("studies", str(totals.studies)), ("instances", str(totals.instances)),
        ("on disk", human_size(totals.local_bytes)),
        ("disk", f"{report.disk.used_percent:.0f}% used,"
                 f" {human_size(report.disk.free_bytes)} free"),
        ("inodes", report.inodes_line),
        *[(f"studies {state}", str(count)) for state, count in sorted(totals.tier_states.items())],
        ("waiting to replicate", human_size(report.sync["bytes_waiting_to_replicate"])),
        ("recalls waiting", str(report.backlog.recalls_pending)),
        ("prefetch priors waiting / failed",
         f"{report.backlog.prefetch_waiting} / {report.backlog.prefetch_failed}"),
        ("last sync pass", human_time(report.sync.get("last_successful_pass_at"))),
        *[(f"{cert.name} certificate expires", human_time(cert.not_after))
          for cert in report.certificates],
        ("peer certificates", report.peer_certificates_line),
        ("site key escrow", report.escrow.escrowed_at or "never"),
        *[(f"drop folder {k}", str(v)) for k, v in sorted(report.dropfolder.items())],
    ]
    if report.audit_forwarding is not None:
        facts.append(("audit records not forwarded", str(report.audit_forwarding.backlog)))
    warnings = "".join(f"<li class=warn>{html.escape(w.message)}</li>"
                       for w in report.warnings) or "<li>none</li>"
    studies = "".join(
        f"<tr><td>{human_time(s.last_received_at)}</td><td>{html.escape(s.modalities)}</td>"
        f"<td>{s.series}</td><td>{s.instances}</td><td>{human_size(s.bytes)}</td>"
        f"<td>{html.escape(s.tier_state)}</td></tr>" for s in recent)
    title = f"pacs-edge {html.escape(config.dicom.ae_title)}: status"
    return (
        f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}"
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{padding:.2em .8em;text-align:left;border-bottom:1px solid #ddd}"
        ".warn{color:#a00;font-weight:bold}</style></head><body>"
        f"<h1>{title}</h1><p>as of {human_time(report.at)}</p><h2>Warnings</h2><ul id=warnings>"
        f"{warnings}</ul><h2>Box</h2><table id=facts>{_rows(facts)}</table>"
        "<h2>Last 50 studies received</h2><table id=recent><tr><th>last received</th>"
        "<th>modalities</th><th>series</th><th>instances</th><th>size</th><th>state</th></tr>"
        f"{studies}</table></body></html>\n")
