"""Launch links: `pacs-edge link` signs, UserService.redeem_link honours a link once.

Links are made by the real CLI on a real home and redeemed by the service on that
home's index (the HTTP side, /launch, is in tests/test_web_login.py). Expiry is
tested with a clock the test advances, never by waiting.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import init_home, run_pacs_edge

from appliance.base.config import config_from_mapping, load_config
from appliance.base.errors import AuthenticationError, AuthFailure
from appliance.services import launch_links
from appliance.services.access import Principal, Role
from appliance.services.users import UserService
from appliance.store.index import Index

T = TypeVar("T")
STUDY = "1.2.826.0.1.3680043.8.498.1"
PASSWORD = "correct horse battery staple"
BASE_URL = "https://pacs.test:8443"


def _home_with_ref1(folder: Path) -> Path:
    home = init_home(folder / "home", default_peer=False)
    pw = folder / "pw"
    pw.write_text(PASSWORD, encoding="utf-8")
    pw.chmod(0o600)
    run_pacs_edge("users", "add", "ref1", "--role", "referring", "--referring", "DOE^JOHN",
                  "--password-file", str(pw), "--home", str(home))
    return home


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return _home_with_ref1(tmp_path)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the tests that only read it (refusals, and links it signs)."""
    return _home_with_ref1(tmp_path_factory.mktemp("links"))


def with_service(home: Path, action: Callable[[UserService], Awaitable[T]], *,
                 clock: Callable[[], float] | None = None, **auth: object) -> T:
    config = config_from_mapping(home, {"auth": auth}) if auth else load_config(home)

    async def go() -> T:
        async with Index(config.index.path) as index:
            return await action(UserService(index, config, **({"clock": clock} if clock else {})))

    return asyncio.run(go())


def make_link(home: Path, *args: str, study: str = STUDY) -> str:
    url = run_pacs_edge("link", study, "--user", "ref1", "--base-url", BASE_URL,
                        "--home", str(home), *args).stdout.strip()
    return url


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["t"][0]


def claims_of(token: str) -> dict[str, object]:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def redeem(home: Path, token: str, **kwargs: object) -> tuple[Principal, str]:
    return with_service(home, lambda s: s.redeem_link(token, address="t"), **kwargs)  # type: ignore[arg-type]


def refusal(home: Path, token: str, **kwargs: object) -> AuthFailure:
    with pytest.raises(AuthenticationError) as caught:
        redeem(home, token, **kwargs)
    return caught.value.kind


def test_link_opens_the_study_for_its_user_once(home: Path) -> None:
    url = make_link(home)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "pacs.test:8443", "/launch")
    token = token_of(url)
    assert token.startswith("v1.")
    principal, study = redeem(home, token)
    assert principal == Principal("ref1", Role.REFERRING, "DOE^JOHN") and study == STUDY
    assert refusal(home, token) is AuthFailure.LINK_USED
    audit = (home / "audit" / "audit.log").read_text(encoding="utf-8")
    assert "User Security Attributes Changed" in audit and STUDY in audit


def test_link_claims_are_the_documented_ones(home: Path) -> None:
    claims = claims_of(token_of(make_link(home, "--ttl", "10m")))
    assert set(claims) == {"u", "s", "iat", "exp", "n"}
    assert claims["u"] == "ref1" and claims["s"] == STUDY
    assert claims["exp"] - claims["iat"] == 600 and len(claims["n"]) == 32


def test_expired_link_refused(home: Path) -> None:
    token = token_of(make_link(home, "--ttl", "2m"))
    expires = float(claims_of(token)["exp"])  # type: ignore[arg-type]
    assert refusal(home, token, clock=lambda: expires) is AuthFailure.LINK_EXPIRED
    principal, _ = redeem(home, token, clock=lambda: expires - 1)
    assert principal.name == "ref1"


def test_forged_signature_refused(home: Path) -> None:
    token = token_of(make_link(home))
    version, body, mac = token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    assert refusal(home, f"{version}.{body}.{flipped}") is AuthFailure.LINK_INVALID
    claims = claims_of(token)
    claims["s"] = "1.2.3.4"  # another study under the genuine signature
    other = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert refusal(home, f"{version}.{other}.{mac}") is AuthFailure.LINK_INVALID
    assert redeem(home, token)[1] == STUDY  # the genuine link still works once


def test_link_with_any_character_of_its_signature_changed_refused(home: Path) -> None:
    """Every other spelling of the MAC is refused: each character replaced by each
    base64url character it is not (the last one's spare bits included: base64 decoding
    ignored them, so 3 of every 4 replacements of the last character were honoured),
    a character outside the alphabet inserted (decoding dropped it), padding added."""
    token = token_of(make_link(home))
    version, body, mac = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    others = [mac[:-1] + c for c in alphabet if c != mac[-1]]
    others += [mac[:i] + ("B" if mac[i] == "A" else "A") + mac[i + 1:] for i in range(len(mac))]
    others += [mac[:5] + junk + mac[5:] for junk in ("!", "*", "=", "~", " ")]
    others += [mac + "=", mac + "==", mac + "!"]

    async def all_refused(service: UserService) -> list[str]:
        honoured = []
        for other in others:
            try:
                await service.redeem_link(f"{version}.{body}.{other}", address="t")
            except AuthenticationError as exc:
                assert exc.kind is AuthFailure.LINK_INVALID, other
            else:
                honoured.append(other)
        return honoured

    assert with_service(home, all_refused) == []
    assert redeem(home, token)[1] == STUDY  # the genuine link still works, once


def test_link_signed_by_another_box_refused(home: Path, tmp_path: Path) -> None:
    other = init_home(tmp_path / "other", default_peer=False)
    pw = tmp_path / "pw"
    run_pacs_edge("users", "add", "ref1", "--role", "referring", "--referring", "DOE^JOHN",
                  "--password-file", str(pw), "--home", str(other))
    token = token_of(make_link(other))
    assert refusal(home, token) is AuthFailure.LINK_INVALID


def test_link_lifetime_beyond_the_configured_maximum_refused(home: Path) -> None:
    proc = run_pacs_edge("link", STUDY, "--user", "ref1", "--ttl", "2h", "--base-url",
                         BASE_URL, "--home", str(home), check=False)
    assert proc.returncode == 2 and "hint:" in proc.stderr and "Traceback" not in proc.stderr
    # Signed with the box's own key but a longer life than the box allows: refused.
    token = launch_links.sign(launch_links.load_link_key(home), user="ref1", study_uid=STUDY,
                              ttl_seconds=2 * 3600, now=time.time())
    assert refusal(home, token) is AuthFailure.LINK_INVALID
    assert redeem(home, token, link_max_ttl_minutes=180.0)[1] == STUDY


@pytest.mark.parametrize("args", [
    ("link", STUDY, "--user", "nobody"),
    ("link", "1.2.abc", "--user", "ref1"),
    ("link", STUDY, "--user", "ref1", "--ttl", "15"),
    ("link", STUDY, "--user", "ref1", "--ttl", "-5m"),
])
def test_link_command_refuses_bad_arguments_with_a_hint(shared_home: Path,
                                                        args: tuple[str, ...]) -> None:
    proc = run_pacs_edge(*args, "--base-url", BASE_URL, "--home", str(shared_home), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_link_without_a_web_server_needs_a_base_url(home: Path) -> None:
    """[http] port = 0 (the test homes'): no https://host:0 link; --base-url is the way."""
    proc = run_pacs_edge("link", STUDY, "--user", "ref1", "--home", str(home), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the web server is off" in proc.stderr and "--base-url" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert STUDY not in (home / "audit" / "audit.log").read_text(encoding="utf-8")  # none signed


@pytest.mark.parametrize("base_url", [
    "javascript:alert(1)", "ftp://x", "ftp://x y", "https://pacs.test:8443 x", "https://",
    "https://:8443", "//pacs.test", "pacs.test:8443", "https://pacs.test:99999",
    "https://pacs.test:port", "https://pacs.test/?next=x", "https://pacs.\ttest",
])
def test_link_refuses_a_base_url_that_is_not_http_with_a_host(shared_home: Path,
                                                              base_url: str) -> None:
    proc = run_pacs_edge("link", STUDY, "--user", "ref1", "--base-url", base_url,
                         "--home", str(shared_home), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Invalid value for '--base-url'" in proc.stderr, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


@pytest.mark.parametrize("base_url", ["http://10.0.0.5:8080", "https://pacs.test:8443/edge/",
                                      "HTTPS://[::1]:8443"])
def test_link_accepts_http_and_https_base_urls(shared_home: Path, base_url: str) -> None:
    url = run_pacs_edge("link", STUDY, "--user", "ref1", "--base-url", base_url,
                        "--home", str(shared_home)).stdout.strip()
    assert url.startswith(base_url.rstrip("/") + "/launch?t=v1.")


def test_link_of_a_removed_user_refused(home: Path) -> None:
    token = token_of(make_link(home))
    run_pacs_edge("users", "remove", "ref1", "--home", str(home))
    assert refusal(home, token) is AuthFailure.LINK_INVALID


def test_link_of_a_removed_user_refused_once_the_name_is_given_again(
        home: Path, tmp_path: Path) -> None:
    """A link names its user; the user removed and the name given to a new account (a
    colleague, another role), the link opened a session for the new account."""
    token = token_of(make_link(home))
    run_pacs_edge("users", "remove", "ref1", "--home", str(home))
    time.sleep(1.1)  # the link's iat is in whole seconds
    run_pacs_edge("users", "add", "ref1", "--role", "radiologist", "--password-file",
                  str(tmp_path / "pw"), "--home", str(home))
    assert refusal(home, token) is AuthFailure.LINK_INVALID
    principal, _ = redeem(home, token_of(make_link(home)))  # a link for the new account
    assert principal.role is Role.RADIOLOGIST


@pytest.mark.parametrize("token", [
    "", "v1", "v1..", "v2.e30.AAAA", "v1.e30." + "A" * 43, "v1.!!!.???", "x" * 5000,
    "v1.e30.AAAA.extra", "ünïcode",
])
def test_malformed_link_refused(shared_home: Path, token: str) -> None:
    assert refusal(shared_home, token) is AuthFailure.LINK_INVALID


def test_init_creates_the_link_key_0600(home: Path) -> None:
    key = home / "secrets" / "link.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32


def test_older_home_gets_a_link_key_on_first_use(home: Path) -> None:
    key = home / "secrets" / "link.key"
    key.unlink()
    token = token_of(make_link(home))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert redeem(home, token)[1] == STUDY


def test_link_key_others_can_read_is_refused(home: Path) -> None:
    key = home / "secrets" / "link.key"
    key.chmod(0o644)
    proc = run_pacs_edge("link", STUDY, "--user", "ref1", "--base-url", BASE_URL,
                         "--home", str(home), check=False)
    assert proc.returncode == 2 and "chmod 600" in proc.stderr and proc.stdout == ""


def test_redeeming_without_a_link_key_refuses_and_creates_none(home: Path) -> None:
    """serve's unit shows it a read-only secrets/: it must not try to make the key."""
    token = token_of(make_link(home))
    key = home / "secrets" / "link.key"
    key.unlink()
    assert refusal(home, token) is AuthFailure.LINK_INVALID
    assert not key.exists()


def test_config_check_reports_the_link_key(home: Path) -> None:
    fresh = run_pacs_edge("config", "check", "--home", str(home))
    assert "ok     launch-link key\n" in fresh.stdout
    key = home / "secrets" / "link.key"
    key.chmod(0o644)
    bad = run_pacs_edge("config", "check", "--home", str(home), check=False)
    assert bad.returncode == 2 and "link.key: secret file has mode 0644" in bad.stderr
    key.unlink()
    older = run_pacs_edge("config", "check", "--home", str(home))
    assert "launch-link key: none yet" in older.stdout


def test_a_used_link_stays_used_when_the_clock_is_stepped_back(home: Path) -> None:
    """A link redeemed after another link's end prunes that link's nonce; a clock
    stepped back into the first link's lifetime (NTP correcting a clock that ran ahead)
    must not open the first link again."""
    first = token_of(make_link(home, "--ttl", "2m"))
    second = token_of(make_link(home, "--ttl", "10m"))
    first_ends = float(claims_of(first)["exp"])  # type: ignore[arg-type]
    redeem(home, first, clock=lambda: first_ends - 60)
    redeem(home, second, clock=lambda: first_ends + 30)
    assert refusal(home, first, clock=lambda: first_ends - 10) is AuthFailure.LINK_USED
