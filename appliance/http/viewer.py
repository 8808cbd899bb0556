"""The OHIF viewer, served by the box at `/` from the build scripts/install-ohif.sh installs.

OHIF is a single-page application: every route it owns (`/`, `/viewer?StudyInstanceUIDs=...`,
`/viewer/dicomweb`, ...) is answered with index.html, and the files of the build (hashed
bundles, wasm codecs, icons) are served as they are. What the box adds:

- `/app-config.js` is generated here, never taken from the build: one DICOMweb data source
  named for the box whose roots are the page's own origin + `/dicom-web`, so the browser
  talks to no other host (no CORS, no public demo server, no telemetry). The roots are
  computed in the browser from `window.location.origin`, which keeps them right behind a
  reverse proxy that renames the host.
- A Content-Security-Policy that lets the page reach its own origin only, so a build that
  tried a third-party host would fail loudly in the browser instead of leaking.
- Files are served only from under the root: a path with `..`, a hidden name or a symlink
  that resolves outside the root is 404, a directory is never listed.
- Hashed assets (`app.bundle.<hash>.js`, `<hash>.wasm`) are immutable and cached for a year;
  everything else (index.html, app-config.js, unhashed css) is revalidated on each load.
- A missing build is a page telling the operator what to run (503), never a 500.

Login is not this module's business: the auth middleware of appliance/http/auth.py redirects
pages to /login before a request reaches these handlers (all but /manifest.json, which
browsers fetch without cookies). The routes here are a catch-all, so
build_app registers them after every other route module.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import logging
import re
from pathlib import Path, PurePosixPath

from aiohttp import web

from appliance.http.auth import DICOMWEB_PREFIX, allow_anonymous
from appliance.http.viewer_recall import RECALL_SCRIPT
from appliance.http.viewer_session import SESSION_SCRIPT

log = logging.getLogger(__name__)

# Keep in step with scripts/install-ohif.sh OHIF_VERSION (a test checks both).
OHIF_VERSION = "3.13.2"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".webapp": "application/x-web-app-manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".xml": "application/xml",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
}
# webpack names chunks "<id>.bundle.<16 hex>.js" and assets "<16 hex>.wasm": a new build
# gets new names, so the bytes behind a name never change.
_HASHED = re.compile(r"(?:^|\.)[0-9a-f]{16}\.[a-z0-9]+$")
_IMMUTABLE = "private, max-age=31536000, immutable"
_REVALIDATE = "no-cache"
# OHIF needs its two inline bootstrap scripts (index.html), wasm codecs and blob: workers;
# nothing off-origin. The inline scripts are allowed by their SHA-256 (inline_script_hashes),
# never by 'unsafe-inline': that would also run any inline event handler or <script> that
# markup in a DICOM value (a Patient Name, a Study Description) got into the page, if the
# viewer ever put one there as HTML. object-src: OHIF shows an Encapsulated PDF in an
# <object> whose data is a blob: URL of the document it fetched from /dicom-web (bulk data),
# which Chromium's PDF viewer then frames (frame-src); without both the viewport said "No
# online PDF viewer installed".
_CSP = (
    "default-src 'self'; "
    "script-src 'self' {hashes}'wasm-unsafe-eval' blob:; "
    "worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; "
    "font-src 'self' data:; "
    "connect-src 'self' data: blob:; "
    "object-src 'self' blob:; frame-src 'self' blob:; base-uri 'self'; frame-ancestors 'self'"
)
# An inline <script> (one without src) and its text, as a browser hashes it for CSP.
_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\ssrc\s*=)[^>]*>(.*?)</script\s*>",
                            re.IGNORECASE | re.DOTALL)

DATA_SOURCE = "pacs-edge"
MANIFEST = "/manifest.json"


AUTO = "auto"


def default_viewer_root() -> Path:
    """Where scripts/install-ohif.sh puts the build, in the checkout this code runs from."""
    return Path(__file__).resolve().parents[2] / ".cache" / "ohif" / OHIF_VERSION


def viewer_root(setting: str, home: Path) -> Path | None:
    """The folder `[http] viewer_root` names: "auto" = the installed build, "" = no viewer,
    else a path (relative ones are inside the data home, like every path in the config)."""
    if setting == AUTO:
        return default_viewer_root()
    if not setting:
        return None
    path = Path(setting).expanduser()
    return path if path.is_absolute() else home / path


def app_config_js(box_name: str) -> str:
    """OHIF's window.config: one DICOMweb source, the box's own /dicom-web, same origin.

    QIDO matching is the box's C-FIND matching: no fuzzy matching, `*`/`?` wildcards.
    Images come by WADO-RS frames and studies load series by series (lazy), which keeps a
    500-slice series from fetching all its metadata before the first image. A study
    being recalled from the cloud gets a status line and reopens by itself
    (viewer_recall.py); a session that ends while the viewer is open sends it to the
    login page (viewer_session.py).
    """
    name = json.dumps(box_name)
    source = json.dumps(DATA_SOURCE)
    return f"""/* Generated by pacs-edge: the box's own DICOMweb, same origin. */
(function () {{
  var root = window.location.origin + '/dicom-web';
  window.config = {{
    name: 'pacs-edge',
    routerBasename: '/',
    extensions: [],
    modes: [],
    customizationService: {{}},
    showStudyList: true,
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
    showErrorDetails: 'production',
    defaultDataSourceName: {source},
    dataSources: [
      {{
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: {source},
        configuration: {{
          friendlyName: {name},
          name: {source},
          wadoUriRoot: root,
          qidoRoot: root,
          wadoRoot: root,
          qidoSupportsIncludeField: true,
          supportsReject: false,
          supportsStow: false,
          dicomUploadEnabled: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
          omitQuotationForMultipartRequest: true,
        }},
      }},
    ],
  }};
}})();
""" + SESSION_SCRIPT + RECALL_SCRIPT


def _page(status: int, title: str, body: str) -> web.Response:
    text = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(
        status=status,
        text=text,
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


class _Viewer:
    """The handlers, bound to one build folder (looked up per request: installing the
    viewer while serve runs takes effect at the next page load)."""

    def __init__(self, root: Path, box_name: str) -> None:
        self._root = root
        self._config = app_config_js(box_name).encode()

    async def app_config(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._config,
            content_type="text/javascript",
            charset="utf-8",
            headers={"Cache-Control": _REVALIDATE, "X-Content-Type-Options": "nosniff"},
        )

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        """The web app manifest, on a route of its own: the one file served without a
        login (auth.allow_anonymous binds a path to the route registered at it)."""
        target = self._root.resolve() / MANIFEST.lstrip("/")
        if not _is_file(target):
            raise web.HTTPNotFound()
        return await _file(target)

    async def static(self, request: web.Request) -> web.StreamResponse:
        if _is_dicomweb(request.path):
            # Not a viewer route: a DICOMweb path no route took is a 404, never a page.
            raise web.HTTPNotFound()
        root = self._root.resolve()
        index = root / "index.html"
        if not index.is_file():
            return _not_installed()
        tail = request.match_info["tail"]
        target = _confine(root, tail)
        if target is None:
            raise web.HTTPNotFound()
        if _is_file(target):
            return await _file(target)
        if PurePosixPath(tail).suffix:
            # A missing asset is a 404: an index.html in its place would be run as code.
            raise web.HTTPNotFound()
        return await _file(index)


def _is_dicomweb(path: str) -> bool:
    return path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/")


def _confine(root: Path, tail: str) -> Path | None:
    """The file `tail` names under `root`, or None for a path that must not be served:
    `..`, hidden names (the install stamp), NUL, backslashes, or a resolved path (symlinks
    followed) outside the root."""
    parts = [p for p in tail.split("/") if p]
    if any(p in (".", "..") or p.startswith(".") or "\x00" in p or "\\" in p for p in parts):
        return None
    target = root.joinpath(*parts).resolve()
    if target != root and not target.is_relative_to(root):
        return None
    return target


def _is_file(path: Path) -> bool:
    """Path.is_file, but False where a name cannot be a file here at all (a component
    longer than the file system allows: ENAMETOOLONG), where Path.is_file raises."""
    try:
        return path.is_file()
    except OSError:
        return False


def inline_script_hashes(page: bytes) -> list[str]:
    """The CSP source expressions ('sha256-...') of the inline scripts of an HTML page."""
    return [f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
            for body in _INLINE_SCRIPT.findall(page) if body]


def page_csp(page: bytes) -> str:
    """The viewer's Content-Security-Policy for this page: its own inline scripts only."""
    return _CSP.format(hashes="".join(f"{h} " for h in inline_script_hashes(page)))


async def _file(path: Path) -> web.FileResponse:
    hashed = _HASHED.search(path.name) is not None
    headers = {
        "Content-Type": _CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
        "Cache-Control": _IMMUTABLE if hashed else _REVALIDATE,
        "X-Content-Type-Options": "nosniff",
    }
    if path.suffix == ".html":
        # Read per request (a few KB): a new build swapped in brings its own scripts.
        headers["Content-Security-Policy"] = page_csp(await asyncio.to_thread(path.read_bytes))
    return web.FileResponse(path, headers=headers)


def _not_installed() -> web.Response:
    # The folder is in serve's log, not on the page: users need not learn the box's paths.
    return _page(
        503,
        "The viewer is not installed",
        "<p>This box has no OHIF viewer installed yet.</p>"
        "<p>Operator: run <code>scripts/install-ohif.sh</code> (or <code>make viewer</code>) "
        "in the pacs-edge folder, or set <code>[http] viewer_root</code> to the folder of an "
        "installed build (serve logs the folder it looks in). DICOMweb at "
        "<code>/dicom-web</code> works without it.</p>",
    )


async def _viewer_off(request: web.Request) -> web.Response:
    return _page(
        404,
        "No viewer on this box",
        "<p>The viewer is turned off (<code>[http] viewer_root</code> is empty). "
        "DICOMweb is at <code>/dicom-web</code>.</p>",
    )


def add_routes(app: web.Application, viewer_root: Path | None, *, box_name: str = "") -> None:
    """Serve the viewer built in `viewer_root` at `/`; None turns the viewer off (then `/`
    says so). Register after every other route: the SPA fallback catches all GETs."""
    if viewer_root is None:
        app.router.add_get("/", _viewer_off)
        return
    if not (viewer_root / "index.html").is_file():
        log.warning("viewer not installed root=%s hint=%s", viewer_root,
                    "run scripts/install-ohif.sh or set [http] viewer_root")
    viewer = _Viewer(viewer_root, box_name or "pacs-edge")
    # Browsers fetch the web app manifest without cookies (no crossorigin attribute on
    # index.html's <link rel=manifest>); it names icons, nothing of the box or its users.
    allow_anonymous(app, MANIFEST)
    app.router.add_get(MANIFEST, viewer.manifest)
    app.router.add_get("/app-config.js", viewer.app_config)
    app.router.add_get("/{tail:.*}", viewer.static)
