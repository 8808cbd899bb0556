"""A radiologist opens a study that was evicted to the cloud: the viewer says it is being
retrieved, and shows it by itself once the recall is done, with no reload by the user.

Everything is real (as in test_viewer_browser.py): `pacs-edge serve` with HTTPS, the
40-slice CT stored with storescu, replicated by `pacs-edge sync --once` to the local-folder
cloud and evicted with `pacs-edge evict`, Debian's headless chromium. The sync agent is
started only once the viewer has been waiting: a recall that takes longer than the box's
`[http] recall_wait_seconds` (3 s here), as a large study or a cool tier does. Before
viewer_recall.py, OHIF's series metadata request got its 503 and the viewport kept its
loading bar for ever, saying nothing, also after the recall was done. A study whose
series metadata is still in the box's cache is laid out at once (its metadata answers
during the recall) and its frames wait instead.

Screenshots stay in the test's tmp_path: recall-waiting.png, recall-opened.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import pytest
import webpeer
from conftest import EdgeServer
from selenium import webdriver
from selenium.webdriver.common.by import By
from syncagent import SyncAgent, evict, sync_once, tier_state
from test_viewer_browser import (
    SLICES,
    USER,
    NetworkLog,
    click_button,
    diagnosed,
    in_the_list,
    login,
    open_launch_link,
    poll,
    rendered,
    text_of,
    viewer_chrome,
)

NOTICE = "being retrieved from the archive"
NOTICE_DEADLINE = 90.0  # the box's 3 s wait, OHIF's start-up on a software renderer

pytestmark = pytest.mark.slow


@pytest.fixture
def stored(tmp_path: Path, free_port: Callable[[], int],
           edge_server_factory: Callable[..., EdgeServer]) -> tuple[EdgeServer, Any]:
    """A running box holding the CT (replicated to the cloud), and no sync agent."""
    server = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()), start=False)
    server.configure(sync={"recall_poll_seconds": 0.2}, http={"recall_wait_seconds": 3.0})
    server.start()
    webpeer.add_user(server, USER, "radiologist")
    series = dicomgen.make_ct_phantom_series(tmp_path / "ct", SLICES)
    dcmtk.storescu(server.port, [i.path for i in series], aec=server.ae_title).check()
    assert "replicated 1 study version" in sync_once(server.home).stdout
    return server, series[0].header


@pytest.fixture
def evicted(stored: tuple[EdgeServer, Any]) -> tuple[EdgeServer, Any]:
    """The same with the CT in the cloud only (evicted)."""
    server, header = stored
    evict(server.home, header.StudyInstanceUID)
    assert tier_state(server, header.StudyInstanceUID) == "evicted"
    return server, header


@pytest.fixture
def browser(tmp_path: Path, stored: tuple[EdgeServer, Any]) -> Iterator[webdriver.Chrome]:
    with viewer_chrome(tmp_path, stored[0]) as driver:
        yield driver


def notice(driver: webdriver.Chrome) -> str | None:
    found = driver.find_elements(By.ID, "pacs-edge-recall")
    text = found[0].text if found and found[0].is_displayed() else ""
    return text if NOTICE in text else None


def wait_for_the_recall(server: EdgeServer, driver: webdriver.Chrome, tmp_path: Path,
                        laid_out: str = "") -> None:
    """The viewer says the study is coming, then shows it once the agent has recalled
    it, without anyone reloading the page. `laid_out`: text the page shows meanwhile."""
    network = NetworkLog(driver)
    said = poll("the being-retrieved notice", lambda: notice(driver), NOTICE_DEADLINE)
    assert laid_out in text_of(driver)
    assert "opens here by itself" in said
    (tmp_path / "recall-waiting.png").write_bytes(driver.get_screenshot_as_png())
    answered = network.dicomweb()
    assert any(status == 503 for _, status in answered)
    assert not any("/frames/" in where and status == 200 for where, status in answered)
    agent = SyncAgent(server.home).start()
    try:
        started = time.monotonic()
        # The page reloads: the notice is gone and the viewport shows the image.
        poll("the recalled study's image", lambda: None if driver.find_elements(
            By.ID, "pacs-edge-recall") else rendered(driver))
        (tmp_path / "recall-opened.png").write_bytes(driver.get_screenshot_as_png())
        print(f"first image {time.monotonic() - started:.1f} s after the agent started")
    finally:
        assert agent.stop() == 0, agent.log()


def test_evicted_study_opened_from_the_study_list_shows_once_recalled(
        evicted: tuple[EdgeServer, Any], browser: webdriver.Chrome, tmp_path: Path) -> None:
    server, header = evicted

    def steps() -> None:
        login(browser, webpeer.base_url(server))
        poll("the study in the study list", lambda: in_the_list(browser, header))
        click_button(browser, "Confirm and hide")
        browser.execute_script(  # no tour pop-ups over the image (test_viewer_browser)
            "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        family, given = str(header.PatientName).split("^")
        browser.find_element(By.XPATH, f"//tr[.//*[text()='{family}, {given}']]").click()
        poll("the Basic Viewer button", lambda: click_button(browser, "Basic Viewer"))
        wait_for_the_recall(server, browser, tmp_path)

    diagnosed(browser, tmp_path, steps)


def test_launch_link_to_an_evicted_study_shows_it_once_recalled(
        evicted: tuple[EdgeServer, Any], browser: webdriver.Chrome, tmp_path: Path) -> None:
    server, header = evicted

    def steps() -> None:
        open_launch_link(browser, server, header.StudyInstanceUID, USER)
        wait_for_the_recall(server, browser, tmp_path)

    diagnosed(browser, tmp_path, steps)


def test_evicted_study_with_cached_metadata_is_laid_out_at_once_and_its_images_follow(
        stored: tuple[EdgeServer, Any], browser: webdriver.Chrome, tmp_path: Path) -> None:
    # Read before eviction (as a radiologist who opened it last month): its series
    # metadata is in the box's cache, answered while the recall runs (dicomweb_metadata),
    # so the viewer lays the study out (its series, with the slice count) at once; the
    # frames wait for the recall, 503 after 3 s, and the notice follows as above.
    server, header = stored
    series = (f"{webpeer.base_url(server)}/dicom-web/studies/{header.StudyInstanceUID}"
              f"/series/{header.SeriesInstanceUID}/metadata")
    assert webpeer.session(server, USER).get(series).status_code == 200
    evict(server.home, header.StudyInstanceUID)

    def steps() -> None:
        login(browser, webpeer.base_url(server))
        poll("the study in the study list", lambda: in_the_list(browser, header))
        click_button(browser, "Confirm and hide")
        browser.execute_script(
            "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        browser.get(f"{webpeer.base_url(server)}/viewer?StudyInstanceUIDs="
                    f"{header.StudyInstanceUID}")
        wait_for_the_recall(server, browser, tmp_path, laid_out=header.SeriesDescription)

    diagnosed(browser, tmp_path, steps)
