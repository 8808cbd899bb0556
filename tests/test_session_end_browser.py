"""A browser whose session has ended is not asked for a password by the browser itself.

/dicom-web answered every request without valid credentials with `401` and
`WWW-Authenticate: Basic`. A browser answers that challenge with its own password
dialog: the viewer's next fetch after the session ended (idle limit, a logout in another
tab, `users passwd`) opened Chromium's "Sign in" dialog and waited on it. Whatever the
user typed there the browser then sent, as HTTP Basic, with every later request to the
box until it was closed: the viewer's Log out ended the session cookie but left
/dicom-web answering PHI to the next person at a shared reading-room workstation.
Browsers (Fetch Metadata headers, or the session cookie) now get a challenge of a scheme
no browser answers by itself, so the page gets the 401; tools still get Basic.

Real: `pacs-edge serve` with HTTPS, a study stored with storescu, Debian's headless
chromium logging in through the login page; the session is ended by a logout of its
own (curl with the browser's cookie). Headless chromium has no one to answer the
dialog, so the fetch that raised one never settles: the script's deadline is that
failure, not a measure of speed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import chromium
import dcmtk
import dicomgen
import pytest
import webpeer
from conftest import EdgeServer
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By

DEADLINE = 60.0
USER = "rad"

pytestmark = pytest.mark.slow


@pytest.fixture
def box(tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    server = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()))
    webpeer.add_user(server, USER, "radiologist")
    study = dicomgen.make_study(tmp_path / "study", seed=351, series_per_study=1,
                                instances_per_series=1)
    dcmtk.storescu(server.port, [i.path for i in study], aec=server.ae_title).check()
    return server


@pytest.fixture
def browser(tmp_path: Path, box: EdgeServer) -> Iterator[webdriver.Chrome]:
    with chromium.chrome(tmp_path / "chromium", box.home / "tls" / "node.pem",
                         deadline=DEADLINE) as driver:
        driver.set_script_timeout(DEADLINE)
        yield driver


def fetch_status(driver: webdriver.Chrome) -> int | str:
    """The status the page's fetch of QIDO-RS gets, or "held" when the browser holds the
    request for a password dialog of its own."""
    try:
        return driver.execute_async_script(  # type: ignore[no-any-return]
            "const done = arguments[arguments.length - 1];"
            "fetch('/dicom-web/studies').then(r => done(r.status), e => done(String(e)));")
    except TimeoutException:
        return "held"


def end_session(box: EdgeServer, token: str) -> None:
    """Log the session out from elsewhere (as another tab, the idle limit or `users
    passwd` would end it), leaving the browser's cookie in place."""
    base = webpeer.base_url(box)
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
         str(webpeer.ca_file(box)), "-X", "POST", "-H", f"Origin: {base}",
         "-H", f"Cookie: __Host-pacs_edge_session={token}", f"{base}/logout"],
        capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == "303"


def test_the_viewer_gets_a_401_not_a_browser_password_dialog_when_its_session_ends(
        box: EdgeServer, browser: webdriver.Chrome) -> None:
    base = webpeer.base_url(box)
    browser.get(f"{base}/login")
    browser.find_element(By.ID, "name").send_keys(USER)
    browser.find_element(By.ID, "password").send_keys(webpeer.PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
    chromium.poll("the login", lambda: "/login" not in browser.current_url, DEADLINE)
    assert fetch_status(browser) == 200

    cookie = browser.get_cookie("__Host-pacs_edge_session")
    assert cookie is not None
    end_session(box, cookie["value"])
    assert fetch_status(browser) == 401, "the browser asked for a password itself"


def test_tools_still_get_a_basic_challenge_and_browsers_another(box: EdgeServer) -> None:
    tool = webpeer.curl(box, "/dicom-web/studies")
    assert tool.status == 401 and tool.headers["www-authenticate"].startswith("Basic ")
    for headers in ({"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Mode": "navigate"},
                    {"Cookie": "__Host-pacs_edge_session=ended"}):
        answer = webpeer.curl(box, "/dicom-web/studies", headers=headers)
        assert answer.status == 401, headers
        assert not answer.headers["www-authenticate"].lower().startswith("basic"), headers
