"""Another site of the same domain cannot plant its session in the box's browser.

Cookies are shared between the sites of one registrable domain: a page on
https://wiki.hospital.test (any intranet site with a hole in it) can set a cookie with
`Domain=hospital.test`, which the browser then sends to https://pacs.hospital.test too.
A session cookie named plainly could so be planted next to the box's own: sent after it,
it was the one the box read, and the user worked on in the planter's session (a referring
physician's account, here), their reads audited under the planter's name. The box's
cookie is `__Host-pacs_edge_session`: browsers take a `__Host-` cookie only host-only,
Secure and with Path=/, so no other host can set or shadow it.

Everything is real: `pacs-edge serve` with HTTPS, users made with the CLI, a study stored
with storescu, Debian's headless chromium (selenium through chromium-driver) resolving
both names to 127.0.0.1 and trusting the box's certificate only; the other site is a
small HTTPS server of the test's on 127.0.0.1 (with the box's certificate: the browser
trusts that key), stopped by the test.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import chromium
import dcmtk
import dicomgen
import pytest
import webpeer
from conftest import EdgeServer
from selenium import webdriver
from selenium.webdriver.common.by import By
from static_site import static_site

DEADLINE = 120.0
BOX_HOST = "pacs.hospital.test"
OTHER_HOST = "wiki.hospital.test"
PLANTER = "planter"  # a referring user whose name no study carries: sees nothing
VICTIM = "reader"  # a radiologist: sees every study

pytestmark = pytest.mark.slow


@pytest.fixture
def box(tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    server = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()))
    webpeer.add_user(server, VICTIM, "radiologist")
    webpeer.add_user(server, PLANTER, "referring", referring="NOBODY^AT ALL")
    study = dicomgen.make_study(tmp_path / "study", seed=345, series_per_study=1,
                                instances_per_series=1)
    dcmtk.storescu(server.port, [i.path for i in study], aec=server.ae_title).check()
    return server


@pytest.fixture
def other_site(tmp_path: Path, box: EdgeServer) -> Iterator[tuple[Path, int]]:
    """An HTTPS server on 127.0.0.1 serving a folder: (the folder, its port)."""
    folder = tmp_path / "wiki"
    folder.mkdir()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(box.home / "tls" / "node.pem",
                            next((box.home / "secrets").glob("node*.key")))
    with static_site(folder, context) as port:
        yield folder, port


@pytest.fixture
def browser(tmp_path: Path, box: EdgeServer) -> Iterator[webdriver.Chrome]:
    with chromium.chrome(tmp_path / "chromium", box.home / "tls" / "node.pem",
                         deadline=DEADLINE, extra_args=(
                             f"--host-resolver-rules=MAP {BOX_HOST} 127.0.0.1,"
                             f" MAP {OTHER_HOST} 127.0.0.1",)) as driver:
        yield driver


def planter_token(box: EdgeServer) -> str:
    """The planter logs in on their own (requests, not the browser): their session token."""
    http = webpeer.session(box, None)
    base = webpeer.base_url(box)
    answer = http.post(f"{base}/login", data={"name": PLANTER, "password": webpeer.PASSWORD},
                       headers={"Origin": base}, allow_redirects=False, timeout=60)
    assert answer.status_code == 303
    (token,) = answer.cookies.values()
    return str(token)


def studies_seen(driver: webdriver.Chrome) -> int:
    """How many studies the box's QIDO-RS shows the page's session (a fetch of the
    viewer page's own: the login page's CSP allows no fetch)."""
    return int(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/dicom-web/studies').then(r => r.ok ? r.json() : [])"
        ".then(a => done(a.length), () => done(-1));"))


def test_a_session_planted_by_another_site_of_the_domain_is_not_used(
        box: EdgeServer, other_site: tuple[Path, int], browser: webdriver.Chrome) -> None:
    base = f"https://{BOX_HOST}:{box.http_port}"
    browser.get(f"{base}/login")
    browser.find_element(By.CSS_SELECTOR, "input[name=name]").send_keys(VICTIM)
    browser.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(webpeer.PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
    chromium.poll("the login", lambda: "/login" not in browser.current_url, DEADLINE)
    assert studies_seen(browser) == 1

    folder, port = other_site
    token = planter_token(box)
    # Both names, so the page plants whatever the box's cookie is called.
    planting = "".join(
        f"document.cookie = '{name}={token}; Domain=hospital.test; Path=/; Secure';"
        for name in ("pacs_edge_session", "__Host-pacs_edge_session"))
    (folder / "index.html").write_text(f"<!doctype html><script>{planting}"
                                       "document.title = 'planted';</script>")
    browser.get(f"https://{OTHER_HOST}:{port}/index.html")
    chromium.poll("the other site's page", lambda: browser.title == "planted", DEADLINE)
    planted = [c["name"] for c in browser.get_cookies()]
    assert "pacs_edge_session" in planted  # the browser took the plain name

    browser.get(f"{base}/")  # back on the box: the viewer's page, which may fetch
    assert studies_seen(browser) == 1, "the box used the session planted by another site"
