"""A radiologist opens a study that was evicted to the cloud: the viewer says it is being
retrieved, and shows it by itself once the recall is done, with no reload by the user,
and without OHIF's "Something went wrong" pop-up for the requests the recall answered.

Everything is real (as in test_viewer_browser.py): `pacs-edge serve` with HTTPS, the
40-slice CT stored with storescu, replicated by `pacs-edge sync --once` to the local-folder
cloud and evicted with `pacs-edge evict`, Debian's headless chromium. The sync agent is
started only once the viewer has been waiting: a recall that takes longer than the box's
`[http] recall_wait_seconds` (3 s here), as a large study or a cool tier does. Before
viewer_recall.py, OHIF's series metadata request got its 503 and the viewport kept its
loading bar for ever, saying nothing, also after the recall was done. A study whose
series metadata is still in the box's cache is laid out at once (its metadata answers
during the recall) and its frames wait instead.

Only the box's recall answers move the viewer: a 503 carrying `PACS-Edge-Recall`
(`recalling`, or `failed` for a recall that failed: the viewer says so, and does not
say the study is on its way). A study whose pack the sync agent's lifecycle put on the
Archive tier is answered `rehydrating` (hours, Retry-After the agent's rehydration
poll): the viewer says it can take hours and the user may close the page.

Screenshots stay in the test's tmp_path: recall-waiting.png, recall-opened.png,
recall-failed.png.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import pytest
import requests
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
ARCHIVE_NOTICE = "this can take hours"
FAILED = "could not be retrieved from the archive"
RECALL_HEADER = "PACS-Edge-Recall"
POP_UP = "Something went wrong"  # OHIF's error pop-up
NOTICE_DEADLINE = 90.0  # the box's 3 s wait, OHIF's start-up on a software renderer

pytestmark = pytest.mark.slow


@pytest.fixture
def stored(tmp_path: Path, free_port: Callable[[], int],
           edge_server_factory: Callable[..., EdgeServer]) -> tuple[EdgeServer, Any]:
    """A running box holding the CT (replicated to the cloud), and no sync agent."""
    return store_the_ct(tmp_path, free_port, edge_server_factory)


def store_the_ct(tmp_path: Path, free_port: Callable[[], int],
                 edge_server_factory: Callable[..., EdgeServer],
                 **sync: float) -> tuple[EdgeServer, Any]:
    server = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()), start=False)
    server.configure(sync={"recall_poll_seconds": 0.2, **sync},
                     http={"recall_wait_seconds": 3.0})
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
def archived(tmp_path: Path, free_port: Callable[[], int],
             edge_server_factory: Callable[..., EdgeServer]) -> tuple[EdgeServer, Any]:
    """The CT evicted, its pack moved to the Archive tier by the sync agent's lifecycle
    (archive_after_days: at once), and no sync agent running. The agent checks an
    archived pack every 2 s (rehydrate_poll_seconds); the local-folder cloud brings it
    online at once when asked (Azure: hours)."""
    server, header = store_the_ct(tmp_path, free_port, edge_server_factory,
                                  rehydrate_poll_seconds=2.0, archive_after_days=1e-9)
    agent = SyncAgent(server.home).start()
    try:  # the lifecycle runs as the agent starts
        poll("the pack on the Archive tier", lambda: pack_tiers(server) == ["Archive"], 60.0)
    finally:
        assert agent.stop() == 0, agent.log()
    evict(server.home, header.StudyInstanceUID)
    return server, header


def pack_tiers(server: EdgeServer) -> list[str]:
    """The access tier of every pack, as the index records it."""
    db = sqlite3.connect(f"file:{server.home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return [str(row[0]) for row in db.execute("SELECT access_tier FROM packs")]
    finally:
        db.close()


@pytest.fixture
def browser(tmp_path: Path, stored: tuple[EdgeServer, Any]) -> Iterator[webdriver.Chrome]:
    with viewer_chrome(tmp_path, stored[0]) as driver:
        yield driver


@pytest.fixture
def archived_browser(tmp_path: Path, archived: tuple[EdgeServer, Any]
                     ) -> Iterator[webdriver.Chrome]:
    with viewer_chrome(tmp_path, archived[0]) as driver:
        yield driver


def notice(driver: webdriver.Chrome, saying: str = NOTICE) -> str | None:
    found = driver.find_elements(By.ID, "pacs-edge-recall")
    text = found[0].text if found and found[0].is_displayed() else ""
    return text if saying in text else None


def lose_the_cloud_copy(server: EdgeServer) -> None:
    """Delete the study's pack from the local-folder cloud: its recall fails."""
    from sync.blobstore.local import LocalFolderStore

    cloud = LocalFolderStore(server.home / "cloud")
    for info in cloud.list():
        if info.name.endswith("pack"):
            cloud.delete(info.name)


def series_metadata(server: EdgeServer, header: Any) -> requests.Response:
    return webpeer.session(server, USER).get(
        f"{webpeer.base_url(server)}/dicom-web/studies/{header.StudyInstanceUID}"
        f"/series/{header.SeriesInstanceUID}/metadata")


def wait_for_the_recall(server: EdgeServer, driver: webdriver.Chrome, tmp_path: Path,
                        laid_out: str = "", saying: str = NOTICE) -> str:
    """The viewer says the study is coming, then shows it once the agent has recalled
    it, without anyone reloading the page. `laid_out`: text the page shows meanwhile;
    `saying`: what the notice says. Returns the notice's text."""
    network = NetworkLog(driver)
    said = poll("the being-retrieved notice", lambda: notice(driver, saying),
                NOTICE_DEADLINE)
    assert laid_out in text_of(driver)
    assert "opens here by itself" in said
    # OHIF's own pop-up would follow a failed request within 0.1 s (its error boundary).
    poll("the notice counting 3 s", lambda: notice(driver, "(waiting 0:03)"))
    assert POP_UP not in text_of(driver)
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
    return said


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
    # frames wait for the recall, 503 after 3 s, and the notice follows as above, with
    # no "Something went wrong" pop-up from OHIF for the frames' 503 (it showed one).
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


def test_recall_answers_name_themselves_and_a_failed_recall_says_so(
        evicted: tuple[EdgeServer, Any]) -> None:
    # A 503 the viewer takes for a recall must be one: the box says which (a full disk
    # or too many connections is a 503 too, without the header).
    server, header = evicted
    running = series_metadata(server, header)  # no agent: the recall waits, 3 s, then 503
    assert running.status_code == 503, running.text
    assert (running.headers.get(RECALL_HEADER), running.headers["Retry-After"]) == (
        "recalling; expect=1800", "2")
    lose_the_cloud_copy(server)
    agent = SyncAgent(server.home).start()
    try:
        failed = poll("the failed recall's answer", lambda: (
            answer if (answer := series_metadata(server, header)).headers.get(RECALL_HEADER)
            == "failed" else None), 60.0)
    finally:
        assert agent.stop() == 0, agent.log()
    assert (failed.status_code, failed.headers["Retry-After"]) == (503, "60")


def test_a_failed_recall_is_shown_as_failed_not_as_on_its_way(
        evicted: tuple[EdgeServer, Any], browser: webdriver.Chrome, tmp_path: Path) -> None:
    # Before: every 503 of a study showed "being retrieved ... opens here by itself",
    # also the recall's failure, and the viewer asked again each minute for 30 minutes.
    server, header = evicted
    lose_the_cloud_copy(server)
    agent = SyncAgent(server.home).start()

    def steps() -> None:
        open_launch_link(browser, server, header.StudyInstanceUID, USER)
        said = poll("the failed-recall notice", lambda: notice(browser, FAILED),
                    NOTICE_DEADLINE)
        (tmp_path / "recall-failed.png").write_bytes(browser.get_screenshot_as_png())
        assert NOTICE not in said and "tell IT" in said

    try:
        diagnosed(browser, tmp_path, steps)
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_study_on_the_archive_tier_is_answered_as_hours_with_a_matching_retry_after(
        archived: tuple[EdgeServer, Any]) -> None:
    # Its recall waits for the pack's rehydration (Azure, Standard priority: up to
    # 15 h): asking every 2 s for a 30-minute give-up was no fit. The box's answer
    # names the case, expects 16 h and asks to be asked again when the agent next
    # checks the rehydration ([sync] rehydrate_poll_seconds, 2 s here).
    server, header = archived
    answer = series_metadata(server, header)
    assert answer.status_code == 503, answer.text
    assert (answer.headers.get(RECALL_HEADER), answer.headers["Retry-After"]) == (
        "rehydrating; expect=57600", "2")


def test_a_study_on_the_archive_tier_says_it_can_take_hours_and_opens_once_back(
        archived: tuple[EdgeServer, Any], archived_browser: webdriver.Chrome,
        tmp_path: Path) -> None:
    # Before: "being retrieved from the archive ... (waiting m:ss)", and a give-up after
    # a constant 30 minutes, whatever the tier.
    server, header = archived
    browser = archived_browser

    def steps() -> None:
        open_launch_link(browser, server, header.StudyInstanceUID, USER)
        said = wait_for_the_recall(server, browser, tmp_path, saying=ARCHIVE_NOTICE)
        assert "long-term archive" in said and "close this page and come back" in said

    diagnosed(browser, tmp_path, steps)
