"""A launch link clicked in a real browser on another site (the EHR) opens the viewer
logged in: the SameSite=Strict session cookie reaches the viewer and DICOMweb.

The EHR is a page served over plain HTTP from 127.0.0.1 (another site than the
box's https://localhost); Debian's headless chromium clicks its link, driven by
selenium through Debian's chromium-driver (Selenium Manager never runs). Chromium
trusts exactly the box's certificate (its SPKI hash).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import chromium
import pytest
import webpeer
from conftest import EdgeServer
from selenium import webdriver
from selenium.webdriver.common.by import By
from static_site import static_site

STUDY = "1.2.826.0.1.3680043.8.498.42"
DEADLINE = 90.0


def wait_for(probe: Callable[[], object], what: str) -> object:
    return chromium.poll(what, probe, DEADLINE)


@pytest.fixture
def box(tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    server = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()))
    webpeer.add_user(server, "ref1", "referring", referring="DOE^JOHN")
    return server


@pytest.fixture
def ehr(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A plain web server on 127.0.0.1 (another site): (its folder, its base URL)."""
    folder = tmp_path / "ehr"
    folder.mkdir()
    with static_site(folder) as port:
        yield folder, f"http://127.0.0.1:{port}"


@pytest.fixture
def browser(tmp_path: Path, box: EdgeServer) -> Iterator[webdriver.Chrome]:
    with chromium.chrome(tmp_path / "chromium", box.home / "tls" / "node.pem",
                         deadline=DEADLINE) as driver:
        yield driver


def fetch_status(driver: webdriver.Chrome, path: str) -> int:
    """The status of a same-origin fetch made by the page (it carries the page's cookies)."""
    return int(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin', redirect: 'manual'})"
        ".then(r => done(r.status), () => done(-1));", path))


def test_launch_link_clicked_on_the_ehr_opens_the_viewer_logged_in(
        box: EdgeServer, ehr: tuple[Path, str], browser: webdriver.Chrome) -> None:
    url = box.cli("link", STUDY, "--user", "ref1", "--base-url",
                  webpeer.base_url(box)).stdout.strip()
    folder, ehr_url = ehr
    (folder / "ehr.html").write_text(
        f'<!doctype html><a id="open" href="{html.escape(url)}">Open images</a>',
        encoding="utf-8")
    browser.get(f"{ehr_url}/ehr.html")
    browser.find_element(By.ID, "open").click()
    wait_for(lambda: urlsplit(browser.current_url).path == "/viewer",
             f"the viewer (at {browser.current_url})")
    landed = urlsplit(browser.current_url)
    assert landed.netloc == urlsplit(webpeer.base_url(box)).netloc
    assert landed.query == f"StudyInstanceUIDs={STUDY}"
    cookie = browser.get_cookie("__Host-pacs_edge_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["secure"]
    assert cookie["sameSite"] == "Strict"
    # The viewer's own requests carry the session: DICOMweb answers, no 401, no login.
    assert fetch_status(browser, "/dicom-web/studies") in (200, 204)
    # The same link clicked again is refused: it opens once.
    browser.get(f"{ehr_url}/ehr.html")
    browser.find_element(By.ID, "open").click()
    wait_for(lambda: "already used" in browser.find_element(By.TAG_NAME, "body").text,
             "the refusal page")
