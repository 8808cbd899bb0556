"""A radiologist reads a CT in the browser: login, study list, OHIF viewer, scrolling.

Everything is real: `pacs-edge serve` with HTTPS on a free port of 127.0.0.1, a user made
with `pacs-edge users add`, a 40-slice CT series (tests/dicomgen.py's chest phantom) stored
with dcmtk's storescu, and Debian's chromium, headless, driven by selenium through Debian's
chromium-driver (selenium is given the driver's path, so Selenium Manager never runs and
nothing is downloaded). Chromium trusts exactly the box's certificate (its SPKI hash), not
every certificate.

Chromium is heavy on a small machine: one browser for the whole journey, generous
deadlines, every wait a poll of the page, never a sleep. The screenshot of the rendered
image is kept in the test's tmp_path (viewer.png, and viewer-scrolled.png).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import chromium
import dcmtk
import dicomgen
import numpy as np
import pytest
import webpeer
from conftest import EdgeServer
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from test_session_end_browser import end_session

USER = "reader"  # a radiologist: sees every study
REFERRING = "welby"  # a referring physician: sees the CT (referred by WELBY^MARCUS) only
OTHER_STUDY_SEED = 1  # dicomgen.make_study(seed=1): SMITH^JOHN, referred by KILDARE^JAMES
SLICES = 40
# Generous: a cold OHIF load parses ~20 MB of JavaScript with a software renderer.
PAGE_DEADLINE = 240.0
T = TypeVar("T")

pytestmark = pytest.mark.slow


@pytest.fixture
def box(tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> tuple[EdgeServer, list[Any]]:
    """A running box with the users, the stored CT series and another study (in this
    order in the returned list: the CT's instances, then the other study's)."""
    server = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()))
    webpeer.add_user(server, USER, "radiologist")
    series = dicomgen.make_ct_phantom_series(tmp_path / "ct", SLICES)
    other = dicomgen.make_study(tmp_path / "other", seed=OTHER_STUDY_SEED)
    assert series[0].header.ReferringPhysicianName != other[0].header.ReferringPhysicianName
    webpeer.add_user(server, REFERRING, "referring",
                     referring=str(series[0].header.ReferringPhysicianName))
    dcmtk.storescu(server.port, [i.path for i in series + other], aec=server.ae_title).check()
    return server, series + other


def viewer_chrome(tmp_path: Path, server: EdgeServer) -> AbstractContextManager[webdriver.Chrome]:
    """Headless chromium sized for the viewer, trusting `server`'s certificate, with its
    network log on (NetworkLog) and WebGL in software."""
    return chromium.chrome(tmp_path / "chromium", server.home / "tls" / "node.pem",
                           deadline=PAGE_DEADLINE, performance_log=True,
                           extra_args=("--window-size=1280,900", "--enable-unsafe-swiftshader"))


@pytest.fixture
def browser(tmp_path: Path, box: tuple[EdgeServer, list[Any]]) -> Iterator[webdriver.Chrome]:
    with viewer_chrome(tmp_path, box[0]) as driver:
        yield driver


def poll(what: str, probe: Callable[[], T | None], deadline: float = PAGE_DEADLINE) -> T:
    return chromium.poll(what, probe, deadline)


def text_of(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def click_button(driver: webdriver.Chrome, label: str) -> bool:
    for button in driver.find_elements(By.TAG_NAME, "button"):
        if button.text.strip() == label and button.is_displayed():
            button.click()
            return True
    return False


def viewport(driver: webdriver.Chrome) -> WebElement | None:
    panes = driver.find_elements(By.CSS_SELECTOR, "[data-cy=viewport-pane]")
    return panes[0] if panes else None


def position(driver: webdriver.Chrome) -> str | None:
    """The viewport's 'I:40 (1/40)' overlay: which slice of how many is shown."""
    overlay = driver.find_elements(By.CSS_SELECTOR, "[data-cy=viewport-overlay-bottom-right]")
    text = overlay[0].text.strip() if overlay else ""
    return text if f"/{SLICES})" in text else None


def image_of(element: WebElement) -> np.ndarray:
    png = element.screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def rendered(driver: webdriver.Chrome) -> np.ndarray | None:
    """The viewport's pixels once they show an image: the slice overlay is up and the
    pixels are not blank or uniform (a standard deviation above 20 of 255 grey levels)."""
    pane = viewport(driver)
    if pane is None or position(driver) is None:
        return None
    pixels = image_of(pane)
    return pixels if pixels.std() > 20 else None


class NetworkLog:
    """The /dicom-web responses a browser got, from Chrome's performance log (which
    get_log drains: this keeps what every call returned)."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self._driver = driver
        self._seen: list[tuple[str, int]] = []

    def dicomweb(self) -> list[tuple[str, int]]:
        """(path?query, status) of every /dicom-web response so far."""
        for entry in self._driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] != "Network.responseReceived":
                continue
            response = message["params"]["response"]
            url = urlsplit(response["url"])
            if url.path.startswith("/dicom-web/"):
                where = f"{url.path}?{url.query}" if url.query else url.path
                self._seen.append((where, int(response["status"])))
        return list(self._seen)


def fetch_status(driver: webdriver.Chrome, path: str) -> int | str:
    """The status of a fetch() the page makes itself (its session cookie goes along)."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => done(r.status), e => done(String(e)));", path)


def diagnosis(driver: webdriver.Chrome, folder: Path) -> str:
    """What the page showed when a step failed: a screenshot in `folder`, the URL, the
    page's text, its console errors and every DICOMweb status."""
    driver.save_screenshot(str(folder / "failure.png"))
    errors = [e["message"][:300] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return (f"url: {driver.current_url}\npage text: {text_of(driver)[:1500]}\n"
            f"console errors: {errors[:20]}\n"
            f"dicomweb: {NetworkLog(driver).dicomweb()[-40:]}\n"
            f"screenshot: {folder / 'failure.png'}")


def open_launch_link(driver: webdriver.Chrome, server: EdgeServer, study_uid: str,
                     user: str) -> None:
    """Open a launch link to `study_uid` for `user` as an EHR does (no session yet), up
    to the viewer on that study with its disclaimer confirmed."""
    url = server.cli("link", study_uid, "--user", user, "--base-url",
                     webpeer.base_url(server)).stdout.strip()
    driver.get(url)
    poll("the viewer on the linked study",
         lambda: f"/viewer?StudyInstanceUIDs={study_uid}" in driver.current_url)
    click_button(driver, "Confirm and hide")


def login(driver: webdriver.Chrome, base: str, user: str = USER) -> None:
    driver.get(base + "/")
    poll("the login page", lambda: "/login" in driver.current_url
         and bool(driver.find_elements(By.CSS_SELECTOR, "input[type=password]")))
    driver.find_element(By.CSS_SELECTOR, "input[name=name]").send_keys(user)
    driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(webpeer.PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "form [type=submit]").click()


def in_the_list(driver: webdriver.Chrome, header: Any) -> bool:
    """Whether the study list shows the study of `header` (patient as OHIF writes it)."""
    family, given = str(header.PatientName).split("^")
    text = text_of(driver)
    return f"{family}, {given}" in text and header.StudyDescription in text


def diagnosed(browser: webdriver.Chrome, tmp_path: Path, steps: Callable[[], None]) -> None:
    try:
        steps()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnosis(browser, tmp_path)}") from exc


def test_radiologist_logs_in_opens_the_ct_and_scrolls_through_it(
        box: tuple[EdgeServer, list[Any]], browser: webdriver.Chrome, tmp_path: Path) -> None:
    diagnosed(browser, tmp_path, lambda: read_the_ct(box, browser, tmp_path))


def test_referring_physician_sees_only_their_studies_in_the_viewer(
        box: tuple[EdgeServer, list[Any]], browser: webdriver.Chrome, tmp_path: Path) -> None:
    server, instances = box
    mine, other = instances[0].header, instances[-1].header
    network = NetworkLog(browser)

    def steps() -> None:
        login(browser, webpeer.base_url(server), REFERRING)
        poll("their study in the study list", lambda: in_the_list(browser, mine))
        assert not in_the_list(browser, other)
        assert str(other.PatientName).split("^")[0] not in text_of(browser)
        # Asking the viewer for the other study by its UID shows nothing: QIDO finds no
        # series in it, OHIF says the study is not available, and no retrieve succeeded.
        browser.get(f"{webpeer.base_url(server)}/viewer?StudyInstanceUIDs="
                    f"{other.StudyInstanceUID}")
        poll("the study-not-available page", lambda: "/notfoundstudy" in browser.current_url)
        assert "not available" in text_of(browser)
        assert rendered(browser) is None
        retrieved = [(where, status) for where, status in network.dicomweb()
                     if other.StudyInstanceUID in where and status < 400
                     and any(part in where for part in ("/metadata", "/frames", "/rendered",
                                                         "/thumbnail", "/bulkdata"))]
        assert not retrieved, retrieved
        assert str(other.PatientName).split("^")[0] not in text_of(browser)
        # Nor can the page's own session fetch it: out of scope is 404, like no such study.
        metadata = (f"/dicom-web/studies/{other.StudyInstanceUID}/series/"
                    f"{other.SeriesInstanceUID}/metadata")
        assert fetch_status(browser, metadata) == 404
        assert fetch_status(browser, f"/dicom-web/studies/{mine.StudyInstanceUID}/series/"
                                     f"{mine.SeriesInstanceUID}/metadata") == 200

    diagnosed(browser, tmp_path, steps)


def test_launch_link_opens_the_study_in_the_viewer_without_a_login(
        box: tuple[EdgeServer, list[Any]], browser: webdriver.Chrome, tmp_path: Path) -> None:
    server, instances = box
    header = instances[0].header

    def steps() -> None:
        open_launch_link(browser, server, header.StudyInstanceUID, REFERRING)
        assert poll("the linked image", lambda: rendered(browser)).std() > 20
        (tmp_path / "launched.png").write_bytes(browser.get_screenshot_as_png())
        failed = [(w, s) for w, s in NetworkLog(browser).dicomweb() if s >= 400]
        assert not failed, failed

    diagnosed(browser, tmp_path, steps)


def test_encapsulated_pdf_shows_in_the_viewer(
        box: tuple[EdgeServer, list[Any]], browser: webdriver.Chrome, tmp_path: Path) -> None:
    # OHIF shows an Encapsulated PDF in an <object> on a blob: URL of the document (from
    # the metadata's InlineBinary, or fetched as bulk data when over 1 KiB); the page's
    # CSP had object-src 'none' (and no frame-src, for Chromium's PDF viewer), so a
    # scanned report was a black "No online PDF viewer installed".
    server, instances = box
    pdf = dicomgen.make_encapsulated_pdf(tmp_path / "pdf", instances[-1].header)
    dcmtk.storescu(server.port, [pdf.path], aec=server.ae_title).check()
    network = NetworkLog(browser)

    def shown() -> np.ndarray | None:
        pane = viewport(browser)
        if pane is None or not browser.find_elements(By.CSS_SELECTOR, "object[data^='blob:']"):
            return None
        pixels = image_of(pane)  # a white page on the PDF viewer's grey, not black
        return pixels if pixels.mean() > 40 else None

    def steps() -> None:
        login(browser, webpeer.base_url(server))
        poll("the study list", lambda: "/login" not in browser.current_url
             and in_the_list(browser, instances[0].header))
        click_button(browser, "Confirm and hide")
        browser.execute_script(  # no tour pop-ups dimming the page (see read_the_ct)
            "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        browser.get(f"{webpeer.base_url(server)}/viewer?StudyInstanceUIDs="
                    f"{pdf.study_uid}&initialSeriesInstanceUID={pdf.header.SeriesInstanceUID}")
        poll("the PDF page", shown, 120.0)
        (tmp_path / "pdf.png").write_bytes(browser.get_screenshot_as_png())
        blocked = [e["message"] for e in browser.get_log("browser")
                   if "Content Security Policy" in e["message"]]
        assert not blocked, blocked
        failed = [(where, status) for where, status in network.dicomweb() if status >= 400]
        assert not failed, failed

    diagnosed(browser, tmp_path, steps)


def read_the_ct(box: tuple[EdgeServer, list[Any]], browser: webdriver.Chrome,
                tmp_path: Path) -> None:
    server, series = box
    header = series[0].header
    base = webpeer.base_url(server)
    network = NetworkLog(browser)
    login(browser, base)

    # The study list (OHIF at /) shows the study: its patient and its description.
    poll("the study in the study list", lambda: in_the_list(browser, header))
    click_button(browser, "Confirm and hide")  # OHIF's investigational-use notice
    # OHIF tours a first-time user through the viewer, with pop-ups over the image; this
    # reader has seen the tour (OHIF keeps that in localStorage 'shownTours').
    browser.execute_script(
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    family, given = str(header.PatientName).split("^")
    row = browser.find_element(By.XPATH, f"//tr[.//*[text()='{family}, {given}']]")
    row.click()
    poll("the Basic Viewer button", lambda: click_button(browser, "Basic Viewer"))
    poll("the viewer route", lambda: "/viewer?StudyInstanceUIDs=" in browser.current_url
         and header.StudyInstanceUID in browser.current_url)

    # The image renders: the viewport is not blank.
    before = poll("the first image", lambda: rendered(browser))
    first = position(browser)
    (tmp_path / "viewer.png").write_bytes(browser.get_screenshot_as_png())
    assert not browser.find_elements(By.CSS_SELECTOR, ".shepherd-element"), "a tour pop-up"

    # The mouse wheel moves to another slice and the image changes with it.
    pane = viewport(browser)
    assert pane is not None
    wheel = ActionChains(browser)
    for _ in range(SLICES // 3):  # one wheel notch, one slice
        wheel.scroll_from_origin(ScrollOrigin.from_element(pane), 0, 120)
    wheel.perform()
    poll("another slice", lambda: position(browser) not in (None, first))

    def another_image() -> np.ndarray | None:
        now = rendered(browser)
        return now if now is not None and np.abs(now - before).mean() > 1.0 else None

    poll("the image of another slice", another_image)
    (tmp_path / "viewer-scrolled.png").write_bytes(browser.get_screenshot_as_png())

    # Every DICOMweb request the browser made succeeded, and frames were among them.
    responses = network.dicomweb()
    assert responses, "the viewer made no DICOMweb request"
    failed = [(path, status) for path, status in responses if status >= 400]
    assert not failed, failed
    assert any("/frames/" in where for where, _ in responses)
    assert any(where.endswith("/metadata") for where, _ in responses)


def test_a_session_that_ends_while_the_viewer_is_open_leads_to_the_login_page(
        box: tuple[EdgeServer, list[Any]], browser: webdriver.Chrome, tmp_path: Path) -> None:
    # The viewer is one page: a session ending while it was open (idle limit, a logout
    # elsewhere) never showed the login page. Opening the study's PDF then loaded the PDF
    # viewport's stylesheet, which the box redirected to /login, and OHIF showed a black
    # page; a series not yet loaded got 401s and stayed empty.
    server, instances = box
    header = instances[0].header
    pdf = dicomgen.make_encapsulated_pdf(tmp_path / "pdf", header)
    dcmtk.storescu(server.port, [pdf.path], aec=server.ae_title).check()
    base = webpeer.base_url(server)
    viewer = f"/viewer?StudyInstanceUIDs={header.StudyInstanceUID}"

    def pdf_thumbnail() -> WebElement | None:
        return next((t for t in browser.find_elements(
            By.CSS_SELECTOR, "[data-cy^=study-browser-thumbnail]")
            if "Scanned report" in t.text), None)

    def steps() -> None:
        login(browser, base)
        poll("the study list", lambda: in_the_list(browser, header))
        click_button(browser, "Confirm and hide")
        browser.execute_script(  # no tour pop-ups over the thumbnails (see read_the_ct)
            "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        browser.get(base + viewer)
        poll("the CT", lambda: rendered(browser))
        thumbnail = poll("the PDF's thumbnail", pdf_thumbnail)
        session = browser.get_cookie("__Host-pacs_edge_session")
        assert session is not None
        end_session(server, session["value"])
        ActionChains(browser).double_click(thumbnail).perform()
        poll("the login page", lambda: urlsplit(browser.current_url).path == "/login"
             and browser.find_elements(By.CSS_SELECTOR, "input[type=password]"))
        assert parse_qs(urlsplit(browser.current_url).query)["next"] == [viewer]
        browser.find_element(By.CSS_SELECTOR, "input[name=name]").send_keys(USER)
        browser.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(
            webpeer.PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
        poll("the viewer on the study again", lambda: rendered(browser))
        assert browser.current_url == base + viewer

    diagnosed(browser, tmp_path, steps)
