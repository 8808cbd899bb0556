"""The viewer's static serving (appliance/http/viewer.py) and its install (install-ohif.sh).

The routes run in a real aiohttp server on 127.0.0.1 and a free port, asked by curl (its own
HTTP stack, `--path-as-is` so traversal attempts reach the server unnormalised). Most tests
serve a small build folder made here, so that symlinks and secrets outside the root can be
planted; the tests of the install read the real build scripts/install-ohif.sh put in place.
Login in front of these routes is the auth middleware's, checked against a real
`pacs-edge serve` at the end.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
import webpeer
from aiohttp import web
from conftest import EdgeServer
from webpeer import Curl, parse_response

from appliance.http import viewer

ROOT = Path(__file__).resolve().parents[1]
INDEX = b"<!doctype html><html><body><div id=root></div></body></html>"
SECRET = b"outside-the-root-secret"
HASHED_JS = "app.bundle.0f6159c501addfe9.js"
HASHED_WASM = "0ddf166f7a343eda.wasm"
# The public demo server the package's own app-config.js points at.
DEMO_HOST = "d14fa38qiwhyfd.cloudfront.net"


@pytest.fixture
def build(tmp_path: Path) -> Path:
    """A viewer build in miniature, with a secret beside it and symlinks out of it."""
    root = tmp_path / "build"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_bytes(INDEX)
    (root / HASHED_JS).write_text("console.log('app');\n")
    (root / HASHED_WASM).write_bytes(b"\0asm\x01\0\0\0")
    (root / "app.bundle.css").write_text("body{}\n")
    (root / "manifest.json").write_text("{}\n")
    (root / "assets" / "favicon.ico").write_bytes(b"\0\0\1\0")
    (root / ".pacs-edge-installed").write_text("sha512-stamp")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (root / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (root / "outside").symlink_to(tmp_path)
    return root


@asynccontextmanager
async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def served(build: Path) -> AsyncIterator[str]:
    app = web.Application()
    viewer.add_routes(app, build, box_name="EDGE")
    async with _serve(app) as url:
        yield url


async def curl(url: str, *options: str) -> Curl:
    """GET with curl, off the event loop the server runs on."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http1.1", "--path-as-is", "-D", "-", "--max-time", "60", *options, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode == 0, err.decode()
    return parse_response(out)


@pytest.mark.parametrize("path", ["/", "/viewer?StudyInstanceUIDs=1.2.3",
                                  "/viewer/dicomweb?StudyInstanceUIDs=1.2.3", "/local",
                                  "/assets/"])
async def test_viewer_routes_get_index_html_and_directories_are_never_listed(
        served: str, path: str) -> None:
    answer = await curl(served + path)
    assert answer.status == 200
    assert answer.body == INDEX
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["cache-control"] == "no-cache"
    assert "default-src 'self'" in answer.headers["content-security-policy"]


@pytest.mark.parametrize("path", [
    "/../secret.txt",
    "/assets/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/..%2fsecret.txt",
    "/assets/..%2f..%2fsecret.txt",
    "/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/leak.txt",
    "/outside/secret.txt",
    "/outside/",
    "/.pacs-edge-installed",
    "/assets%5c..%5c..%5csecret.txt",
])
async def test_viewer_refuses_paths_out_of_its_root(served: str, path: str) -> None:
    answer = await curl(served + path)
    assert answer.status == 404
    assert SECRET not in answer.body
    assert b"root:" not in answer.body


async def test_a_missing_asset_is_404_not_the_index_page(served: str) -> None:
    answer = await curl(served + "/9999.bundle.0123456789abcdef.js")
    assert answer.status == 404
    assert answer.body != INDEX


async def test_a_name_too_long_for_the_file_system_is_a_route_or_a_missing_asset(
        served: str) -> None:
    """Path.is_file raises ENAMETOOLONG for a 300-character name (a 500 before): it is
    answered like any other name that is not a file."""
    route = await curl(served + "/" + "a" * 300)
    assert (route.status, route.body) == (200, INDEX)
    asset = await curl(served + "/assets/" + "a" * 300 + ".js")
    assert asset.status == 404


async def test_unknown_dicomweb_paths_are_404_not_the_index_page(served: str) -> None:
    for path in ("/dicom-web", "/dicom-web/nothing-here"):
        answer = await curl(served + path)
        assert answer.status == 404, path
        assert answer.body != INDEX


@pytest.mark.parametrize(("name", "content_type", "cache"), [
    (HASHED_JS, "text/javascript; charset=utf-8", "private, max-age=31536000, immutable"),
    (HASHED_WASM, "application/wasm", "private, max-age=31536000, immutable"),
    ("app.bundle.css", "text/css; charset=utf-8", "no-cache"),
    ("manifest.json", "application/json", "no-cache"),
    ("assets/favicon.ico", "image/x-icon", "no-cache"),
])
async def test_files_have_their_content_type_and_only_hashed_ones_are_immutable(
        served: str, build: Path, name: str, content_type: str, cache: str) -> None:
    answer = await curl(f"{served}/{name}")
    assert answer.status == 200
    assert answer.body == (build / name).read_bytes()
    assert answer.headers["content-type"] == content_type
    assert answer.headers["cache-control"] == cache
    assert answer.headers["x-content-type-options"] == "nosniff"


async def test_revalidated_pages_answer_304_when_unchanged(served: str) -> None:
    first = await curl(served + "/viewer?StudyInstanceUIDs=1.2.3")
    again = await curl(served + "/", "-H", f"If-None-Match: {first.headers['etag']}")
    assert again.status == 304
    assert again.body == b""


async def test_app_config_points_at_the_same_origin_dicomweb(served: str) -> None:
    answer = await curl(served + "/app-config.js")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/javascript; charset=utf-8"
    assert answer.headers["cache-control"] == "no-cache"
    script = answer.body.decode()
    assert not re.search(r"https?://", script), "no absolute URL: same origin only"
    # Run it as the browser would, with a page served from a box behind some host name
    # (and the window's addEventListener: viewer_recall.py listens for rejections).
    probe = (
        "globalThis.window = {location: {origin: 'https://pacs.example.org:8443'},"
        " addEventListener: () => {}};\n"
        f"{script}\n"
        "process.stdout.write(JSON.stringify(window.config));\n"
    )
    run = subprocess.run(["node", "-e", probe], capture_output=True, timeout=60, check=True)
    config = json.loads(run.stdout)
    assert config["defaultDataSourceName"] == "pacs-edge"
    [source] = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    settings = source["configuration"]
    assert settings["friendlyName"] == "EDGE"
    for key in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert settings[key] == "https://pacs.example.org:8443/dicom-web"
    assert settings["supportsFuzzyMatching"] is False
    assert settings["supportsWildcard"] is True
    assert settings["imageRendering"] == "wadors"
    assert settings["thumbnailRendering"] == "wadors"
    assert settings["enableStudyLazyLoad"] is True


async def test_without_a_build_the_page_tells_the_operator_to_install_it(
        tmp_path: Path) -> None:
    app = web.Application()
    viewer.add_routes(app, tmp_path / "not-installed")
    async with _serve(app) as url:
        for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3"):
            answer = await curl(url + path)
            assert answer.status == 503
            assert answer.headers["content-type"].startswith("text/html")
            assert b"scripts/install-ohif.sh" in answer.body
            assert str(tmp_path).encode() not in answer.body  # no paths of the box
        assert (await curl(url + "/dicom-web/studies")).status == 404


async def test_an_empty_viewer_root_turns_the_viewer_off(tmp_path: Path) -> None:
    assert viewer.viewer_root("", tmp_path) is None
    app = web.Application()
    viewer.add_routes(app, None)
    async with _serve(app) as url:
        answer = await curl(url + "/")
        assert answer.status == 404
        assert b"turned off" in answer.body
        assert (await curl(url + "/app-config.js")).status == 404


def test_viewer_root_auto_is_the_installed_build_and_relative_is_in_the_home(
        tmp_path: Path) -> None:
    assert viewer.viewer_root("auto", tmp_path) == ROOT / ".cache" / "ohif" / viewer.OHIF_VERSION
    assert viewer.viewer_root("ohif", tmp_path) == tmp_path / "ohif"
    assert viewer.viewer_root("/srv/ohif", tmp_path) == Path("/srv/ohif")


def test_install_script_pins_the_version_the_server_looks_for() -> None:
    script = (ROOT / "scripts" / "install-ohif.sh").read_text()
    assert f"\nOHIF_VERSION={viewer.OHIF_VERSION}\n" in script
    assert re.search(r'\nOHIF_INTEGRITY="sha512-[A-Za-z0-9+/]{86}=="\n', script)


def test_installed_build_has_no_demo_servers_source_maps_or_ai_runtime() -> None:
    subprocess.run([str(ROOT / "scripts" / "install-ohif.sh")], check=True, timeout=600)
    again = subprocess.run([str(ROOT / "scripts" / "install-ohif.sh")], capture_output=True,
                           check=True, timeout=60)
    assert again.stdout == again.stderr == b"", "a second install must be silent"
    build = viewer.default_viewer_root()
    assert (build / "index.html").is_file()
    for name in ("app-config.js", "google.js", "sw.js", "oidc-client.min.js", "serve.json"):
        assert not (build / name).exists(), name
    assert not (build / "ort").exists()
    assert not list(build.rglob("*.map"))
    for page in ("index.html", "init-service-worker.js"):
        text = (build / page).read_text()
        assert DEMO_HOST not in text
        assert not re.search(r"https?://", text), page
    # Every script index.html loads is in the build (app-config.js comes from the box).
    for src in re.findall(r'src="/([^"]+)"', (build / "index.html").read_text()):
        assert src == "app-config.js" or (build / src).is_file(), src


async def test_installed_bundles_cross_the_wire_gzipped_to_browsers_that_accept_it() -> None:
    subprocess.run([str(ROOT / "scripts" / "install-ohif.sh")], check=True, timeout=600)
    build = viewer.default_viewer_root()
    [bundle] = build.glob("app.bundle.*.js")
    app = web.Application()
    viewer.add_routes(app, build)
    async with _serve(app) as url:
        zipped = await curl(f"{url}/{bundle.name}", "-H", "Accept-Encoding: gzip")
        plain = await curl(f"{url}/{bundle.name}")
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["content-type"] == "text/javascript; charset=utf-8"
    assert zipped.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert len(zipped.body) < bundle.stat().st_size // 3
    assert gzip.decompress(zipped.body) == plain.body == bundle.read_bytes()
    assert "content-encoding" not in plain.headers


def test_anonymous_paths_open_only_their_own_routes(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    # A request for a path that needs no login, which the router hands to another route,
    # needs one: HEAD /launch (the route is GET only, so a link checker cannot use a link
    # up) and /metrics with metrics off fell through to the viewer's catch-all and were
    # answered its page, 200, without a login.
    home = webpeer.web_home(tmp_path / "web-home", free_port())
    EdgeServer(home).configure(metrics={"enabled": False})
    server = edge_server_factory(home)
    http = webpeer.session(server, None)  # requests: curl -X HEAD would wait for a body
    base = webpeer.base_url(server)
    for method, path in (("HEAD", "/launch?t=v1.x.y"), ("GET", "/metrics"),
                         ("HEAD", "/metrics"), ("PUT", "/login")):
        answer = http.request(method, base + path, allow_redirects=False, timeout=60)
        assert answer.status_code == 303, (method, path, answer.status_code)
        assert answer.headers["Location"].startswith("/login?next=")
    # The routes themselves still need none.
    assert http.get(f"{base}/launch?t=v1.x.y", timeout=60).status_code == 401  # refused link
    assert http.get(f"{base}/login", timeout=60).status_code == 200
    assert http.head(f"{base}/healthz", timeout=60).status_code == 200
    assert http.get(f"{base}/manifest.json", timeout=60).status_code == 200


def test_viewer_files_require_a_login_but_the_manifest(tmp_path: Path, free_port: Callable[[], int],
                                      edge_server_factory: Callable[..., EdgeServer]) -> None:
    server = edge_server_factory(webpeer.web_home(tmp_path / "web-home", free_port()))
    for path in ("/app-config.js", f"/{HASHED_JS}", "/viewer?StudyInstanceUIDs=1.2.3"):
        answer = webpeer.curl(server, path)
        assert answer.status == 303, path
        assert answer.headers["location"].startswith("/login?next=")
        assert b"dicom-web" not in answer.body
    # Browsers fetch the web app manifest without cookies: it alone is public.
    manifest = webpeer.curl(server, "/manifest.json")
    assert manifest.status == 200
    assert json.loads(manifest.body)["name"] == "OHIF Viewer"
