"""Debian's headless chromium for the browser tests, driven by selenium through Debian's
chromium-driver: selenium is given the driver's path, so Selenium Manager never runs and
nothing is downloaded. Chromium trusts exactly the box's certificate (its SPKI hash), not
every certificate.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
T = TypeVar("T")


def poll(what: str, probe: Callable[[], T | None], deadline: float) -> T:
    """probe() until it returns neither None nor False; fail naming `what` at the deadline.
    A WebDriverException counts as "not yet" (the page is still being rebuilt)."""
    end = time.monotonic() + deadline
    last: Exception | None = None
    while True:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except WebDriverException as exc:
            last = exc
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}") from last
        time.sleep(0.25)  # polling interval, not synchronisation


def spki_hash(cert_pem: bytes) -> str:
    """Chromium's --ignore-certificate-errors-spki-list form: base64(sha256(SPKI))."""
    spki = x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextmanager
def chrome(profile: Path, server_cert: Path, *, deadline: float,
           extra_args: tuple[str, ...] = (), performance_log: bool = False,
           ) -> Iterator[webdriver.Chrome]:
    """A headless chromium with its profile in `profile`, trusting `server_cert` only."""
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                f"--ignore-certificate-errors-spki-list={spki_hash(server_cert.read_bytes())}",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", *extra_args):
        options.add_argument(arg)
    if performance_log:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(deadline)
    try:
        yield driver
    finally:
        driver.quit()
