"""Markup in DICOM values never runs in the viewer: shown as text, and blocked by the CSP.

A real `pacs-edge serve` with HTTPS, a study stored with storescu whose Patient Name,
Patient ID, Study and Series Description and Institution Name hold markup, event
handlers and a javascript: URL, and Debian's headless chromium (selenium through
chromium-driver; the browser trusts the box's certificate only). A radiologist opens
the study list and the viewer on that study: the values show as text and nothing of
them runs.

The second line of defence is the viewer's Content-Security-Policy
(appliance/http/viewer.py): OHIF's two inline bootstrap scripts are allowed by their
hashes, so markup that ever reached the page as HTML (an inline event handler, an
inline script) is refused by the browser. The test puts such markup into the page
itself and checks the browser refused to run it (a `securitypolicyviolation` event,
and the handler's effect absent); under the old `script-src 'unsafe-inline'` it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import chromium
import dcmtk
import dicomgen
import pytest
import webpeer
from conftest import EdgeServer
from pydicom import dcmread
from selenium import webdriver
from selenium.webdriver.common.by import By

DEADLINE = 240.0  # a cold OHIF load parses ~20 MB of JavaScript on a shared machine
USER = "reader"
# Each at most 64 characters (LO); no "=" in the name, where it would start another group.
DESCRIPTION = "\"'><img src=x onerror=window.__hostile=1>"
SERIES = "<svg onload=window.__hostile=3>"
NAME = "EVIL<script>window.__hostile++</script>^JOHN"
PLANTED = "img[onerror], svg[onload]"

pytestmark = pytest.mark.slow


@pytest.fixture
def box(tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> tuple[EdgeServer, str]:
    server = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()))
    webpeer.add_user(server, USER, "radiologist")
    study = dicomgen.make_study(tmp_path / "study", seed=343, series_per_study=1,
                                instances_per_series=2)
    for item in study:
        ds = dcmread(item.path)
        ds.PatientName = NAME
        ds.PatientID = "<script>window.__hostile=5</script>"
        ds.StudyDescription = DESCRIPTION
        ds.SeriesDescription = SERIES
        ds.InstitutionName = "javascript:window.__hostile=6"
        ds.save_as(item.path)
    dcmtk.storescu(server.port, [i.path for i in study], aec=server.ae_title).check()
    return server, study[0].study_uid


@pytest.fixture
def browser(tmp_path: Path, box: tuple[EdgeServer, str]) -> Iterator[webdriver.Chrome]:
    with chromium.chrome(tmp_path / "chromium", box[0].home / "tls" / "node.pem",
                         deadline=DEADLINE, performance_log=True,
                         extra_args=("--window-size=1280,900",
                                     "--enable-unsafe-swiftshader")) as driver:
        yield driver


def poll(what: str, probe: Callable[[], Any]) -> Any:
    return chromium.poll(what, probe, DEADLINE)


def body_text(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def hostile_ran(driver: webdriver.Chrome) -> object:
    return driver.execute_script("return window.__hostile === undefined ? null"
                                 " : window.__hostile;")


def planted(driver: webdriver.Chrome) -> bool:
    """Whether a value became markup: an element with a handler, or a script of ours."""
    return bool(driver.find_elements(By.CSS_SELECTOR, PLANTED)) or bool(driver.execute_script(
        "return [...document.scripts].some(s => s.text.includes('__hostile'));"))


def csp_errors(driver: webdriver.Chrome) -> list[str]:
    return [e["message"][:300] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"]]


def injected_handler_outcome(driver: webdriver.Chrome) -> tuple[object, list[str]]:
    """Put an <img> with an inline onerror handler into the page, as markup from a DICOM
    value would arrive, and wait until it either ran or the CSP refused it:
    (what the handler set, the directives the browser reported as violated)."""
    driver.execute_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " e => window.__violations.push(e.effectiveDirective));"
        "document.body.insertAdjacentHTML('beforeend',"
        " '<img id=hostile src=\"data:,x\" onerror=\"window.__injected=1\">');")
    return poll("the injected handler to run or be refused", lambda: driver.execute_script(
        "return (window.__injected !== undefined || window.__violations.length)"
        " ? [window.__injected === undefined ? null : window.__injected,"
        "    window.__violations] : null;"))


def test_markup_in_dicom_values_never_runs_in_the_viewer(
        box: tuple[EdgeServer, str], browser: webdriver.Chrome) -> None:
    server, study_uid = box
    base = webpeer.base_url(server)
    browser.get(base + "/")
    poll("the login page", lambda: browser.find_elements(By.CSS_SELECTOR,
                                                          "input[type=password]"))
    browser.find_element(By.CSS_SELECTOR, "input[name=name]").send_keys(USER)
    browser.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(webpeer.PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()

    poll("the hostile study in the study list", lambda: DESCRIPTION in body_text(browser))
    assert hostile_ran(browser) is None
    assert not planted(browser)

    browser.get(f"{base}/viewer?StudyInstanceUIDs={study_uid}")
    poll("the series description as text in the viewer", lambda: SERIES in body_text(browser))
    assert hostile_ran(browser) is None
    assert not planted(browser)
    # OHIF's own inline bootstrap scripts are allowed (by hash): nothing was refused.
    assert csp_errors(browser) == []

    ran, violated = injected_handler_outcome(browser)
    assert ran is None, "an inline event handler ran in the viewer page"
    assert "script-src-attr" in violated or "script-src" in violated, violated
