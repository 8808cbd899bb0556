"""Web users: `pacs-edge users ...` and the rules of UserService, on a real index.

The CLI runs as its own process on an initialised home, as an operator would;
the service tests run UserService on the same kind of home with a clock the test
advances (lock-out and session expiry are about minutes and hours, never slept).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import _env, init_home, pacs_edge_command, run_pacs_edge

from appliance.base.config import config_from_mapping, load_config
from appliance.base.errors import AuthenticationError, AuthFailure, UserError
from appliance.services import login_throttle
from appliance.services.access import Principal, Role, person_name_key
from appliance.services.login_throttle import AddressThrottle
from appliance.services.users import UserService
from appliance.store.index import Index

T = TypeVar("T")
PASSWORD = "correct horse battery staple"
OTHER_PASSWORD = "another long passphrase"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return init_home(tmp_path / "home", default_peer=False)


def password_file(tmp_path: Path, password: str, *, name: str = "pw", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(password + "\n", encoding="utf-8")
    path.chmod(mode)
    return path


def with_service(home: Path, action: Callable[[UserService], Awaitable[T]], *,
                 clock: Clock | None = None, **auth: object) -> T:
    config = load_config(home)
    if auth:
        config = config_from_mapping(home, {"auth": auth})

    async def go() -> T:
        async with Index(config.index.path) as index:
            return await action(UserService(index, config, **({"clock": clock} if clock else {})))

    return asyncio.run(go())


def logs_in(home: Path, name: str, password: str) -> bool:
    return with_service(home, lambda s: s.authenticate(name, password, address="t")).name == name


def users_json(home: Path) -> list[dict[str, str]]:
    return json.loads(run_pacs_edge("users", "list", "--json", "--home", str(home)).stdout)


def refused(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """An expected failure: exit 2, a one-line error with a hint, never a traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "hint:" in proc.stderr, proc.stderr


# --- the command line ------------------------------------------------------------------

def test_users_add_list_remove(home: Path, tmp_path: Path) -> None:
    pw = password_file(tmp_path, PASSWORD)
    run_pacs_edge("users", "add", "rad1", "--role", "radiologist", "--password-file", str(pw),
                  "--home", str(home))
    run_pacs_edge("users", "add", "ref1", "--role", "referring", "--referring", "DOE^JOHN",
                  "--password-file", str(pw), "--home", str(home))
    listed = {u["name"]: u for u in users_json(home)}
    assert listed["rad1"]["role"] == "radiologist" and listed["rad1"]["referring"] == ""
    assert listed["ref1"]["role"] == "referring" and listed["ref1"]["referring"] == "DOE^JOHN"
    table = run_pacs_edge("users", "list", "--home", str(home)).stdout
    assert "rad1" in table and "DOE^JOHN" in table and PASSWORD not in table
    run_pacs_edge("users", "remove", "rad1", "--home", str(home))
    assert [u["name"] for u in users_json(home)] == ["ref1"]
    audit = (home / "audit" / "audit.log").read_text(encoding="utf-8")
    assert audit.count("User Security Attributes Changed") >= 3 and PASSWORD not in audit


def test_users_add_referring_requires_referring_name(home: Path, tmp_path: Path) -> None:
    pw = password_file(tmp_path, PASSWORD)
    refused(run_pacs_edge("users", "add", "ref1", "--role", "referring", "--password-file",
                          str(pw), "--home", str(home), check=False),
            "a referring user needs the name their studies carry")
    assert users_json(home) == []


def test_users_add_checks_role_arguments_before_asking_for_a_password(home: Path) -> None:
    refused(run_pacs_edge("users", "add", "ref1", "--role", "referring", "--home", str(home),
                          check=False), "a referring user needs the name their studies carry")


def test_users_add_referring_name_refused_for_other_roles(home: Path, tmp_path: Path) -> None:
    pw = password_file(tmp_path, PASSWORD)
    refused(run_pacs_edge("users", "add", "rad1", "--role", "radiologist", "--referring",
                          "DOE^JOHN", "--password-file", str(pw), "--home", str(home),
                          check=False), "--referring is only for --role referring")


def test_users_add_unknown_role_is_a_usage_error(home: Path, tmp_path: Path) -> None:
    proc = run_pacs_edge("users", "add", "x", "--role", "superuser", "--password-file",
                         str(password_file(tmp_path, PASSWORD)), "--home", str(home),
                         check=False)
    assert proc.returncode == 2 and "superuser" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_users_add_refuses_short_password(home: Path, tmp_path: Path) -> None:
    refused(run_pacs_edge("users", "add", "rad1", "--role", "admin", "--password-file",
                          str(password_file(tmp_path, "short")), "--home", str(home),
                          check=False), "shorter than 12 characters")


def test_users_add_refuses_password_file_others_can_read(home: Path, tmp_path: Path) -> None:
    pw = password_file(tmp_path, PASSWORD, mode=0o644)
    refused(run_pacs_edge("users", "add", "rad1", "--role", "admin", "--password-file",
                          str(pw), "--home", str(home), check=False), "can read it")
    assert users_json(home) == []


def test_users_add_refuses_a_taken_name_whatever_its_case(home: Path, tmp_path: Path) -> None:
    pw = password_file(tmp_path, PASSWORD)
    run_pacs_edge("users", "add", "rad1", "--role", "admin", "--password-file", str(pw),
                  "--home", str(home))
    refused(run_pacs_edge("users", "add", "RAD1", "--role", "admin", "--password-file",
                          str(pw), "--home", str(home), check=False), "exists")


def test_users_add_refuses_a_name_with_a_colon(home: Path, tmp_path: Path) -> None:
    refused(run_pacs_edge("users", "add", "a:b", "--role", "admin", "--password-file",
                          str(password_file(tmp_path, PASSWORD)), "--home", str(home),
                          check=False), "user name")


def test_users_add_prompts_twice_without_password_file(home: Path) -> None:
    # A new session has no controlling terminal: the hidden prompt reads standard input.
    proc = subprocess.run(
        [*pacs_edge_command(), "users", "add", "rad1", "--role", "radiologist", "--home",
         str(home)], input=f"{PASSWORD}\n{PASSWORD}\n", capture_output=True, text=True,
        timeout=120, env=_env(), start_new_session=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    assert logs_in(home, "rad1", PASSWORD)


@pytest.mark.parametrize(("args", "said"), [
    (("users", "passwd", "nobody"), "no user 'nobody'"),
    (("users", "add", "rad1", "--role", "radiologist"), "user 'rad1' exists"),
])
def test_a_user_change_that_cannot_apply_is_refused_before_the_password_prompt(
        home: Path, tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    """A mistyped name was found out only after the operator typed a password twice."""
    run_pacs_edge("users", "add", "rad1", "--role", "admin", "--password-file",
                  str(password_file(tmp_path, PASSWORD)), "--home", str(home))
    proc = subprocess.run([*pacs_edge_command(), *args, "--home", str(home)], input="",
                          capture_output=True, text=True, timeout=120, env=_env(),
                          start_new_session=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert said in proc.stderr and "Password" not in proc.stdout + proc.stderr, proc.stderr


def test_users_add_prompt_refuses_a_mismatched_confirmation(home: Path) -> None:
    proc = subprocess.run(
        [*pacs_edge_command(), "users", "add", "rad1", "--role", "radiologist", "--home",
         str(home)], input=f"{PASSWORD}\n{OTHER_PASSWORD}\n", capture_output=True, text=True,
        timeout=120, env=_env(), start_new_session=True)
    assert proc.returncode != 0 and users_json(home) == []


def test_password_is_stored_only_as_a_salted_scrypt_hash(home: Path, tmp_path: Path) -> None:
    pw = password_file(tmp_path, PASSWORD)
    for name in ("a1", "a2"):
        run_pacs_edge("users", "add", name, "--role", "admin", "--password-file", str(pw),
                      "--home", str(home))
    index = load_config(home).index.path
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True) as conn:
        hashes = [row[0] for row in conn.execute("SELECT password_hash FROM users")]
    assert all(h.startswith("scrypt$32768$8$1$") for h in hashes)
    assert hashes[0] != hashes[1]  # salted
    for path in index.parent.glob(index.name + "*"):
        assert PASSWORD.encode() not in path.read_bytes()


def test_users_passwd_ends_sessions_and_changes_the_password(home: Path, tmp_path: Path) -> None:
    run_pacs_edge("users", "add", "rad1", "--role", "radiologist", "--password-file",
                  str(password_file(tmp_path, PASSWORD)), "--home", str(home))

    async def login(service: UserService) -> str:
        principal = await service.authenticate("rad1", PASSWORD, address="t")
        return await service.open_session(principal, address="t")

    token = with_service(home, login)
    run_pacs_edge("users", "passwd", "rad1", "--password-file",
                  str(password_file(tmp_path, OTHER_PASSWORD, name="pw2")), "--home", str(home))

    async def after(service: UserService) -> None:
        with pytest.raises(AuthenticationError) as expired:
            await service.session(token)
        assert expired.value.kind is AuthFailure.EXPIRED
        with pytest.raises(AuthenticationError):
            await service.authenticate("rad1", PASSWORD, address="t")
        assert (await service.authenticate("rad1", OTHER_PASSWORD, address="t")).name == "rad1"

    with_service(home, after)


@pytest.mark.parametrize("how", ["stdin", "prompt"])
def test_users_passwd_refuses_a_password_that_is_not_utf8(home: Path, tmp_path: Path,
                                                          how: str) -> None:
    run_pacs_edge("users", "add", "rad2", "--role", "radiologist", "--password-file",
                  str(password_file(tmp_path, PASSWORD)), "--home", str(home))
    bad = b"\xff\xfe" + OTHER_PASSWORD.encode() + b"\n"
    args = ["--password-file", "-"] if how == "stdin" else []
    # A new session has no controlling terminal: the hidden prompt reads standard input.
    proc = subprocess.run(
        [*pacs_edge_command(), "users", "passwd", "rad2", *args, "--home", str(home)],
        input=bad * (1 if args else 2), capture_output=True, timeout=120, env=_env(),
        start_new_session=True)
    refused(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                        proc.stderr.decode()), "is not UTF-8 text")
    assert logs_in(home, "rad2", PASSWORD)


def test_users_unlock_lifts_a_lockout(home: Path, tmp_path: Path) -> None:
    run_pacs_edge("users", "add", "rad1", "--role", "radiologist", "--password-file",
                  str(password_file(tmp_path, PASSWORD)), "--home", str(home))

    async def lock(service: UserService) -> None:
        for _ in range(service.config.auth.max_failed_logins):
            with pytest.raises(AuthenticationError):
                await service.authenticate("rad1", "wrong password!", address="t")

    with_service(home, lock)
    assert users_json(home)[0]["locked_until"] != ""
    run_pacs_edge("users", "unlock", "rad1", "--home", str(home))
    assert users_json(home)[0]["locked_until"] == ""
    assert logs_in(home, "rad1", PASSWORD)


@pytest.mark.parametrize("command", [("remove",), ("unlock",)])
def test_users_commands_on_an_unknown_user_say_so(home: Path, command: tuple[str, ...]) -> None:
    refused(run_pacs_edge("users", *command, "nobody", "--home", str(home), check=False),
            "no user 'nobody'")


# --- the service: logins and lock-out ---------------------------------------------------

async def _add(service: UserService, name: str = "rad1", role: Role = Role.RADIOLOGIST,
               referring: str = "") -> None:
    await service.add_user(name, role, PASSWORD, referring_name=referring)


def test_unknown_user_and_wrong_password_get_the_same_error(home: Path) -> None:
    async def scenario(service: UserService) -> list[AuthenticationError]:
        await _add(service)
        errors = []
        for name, password in (("rad1", "wrong password!"), ("nobody", PASSWORD)):
            with pytest.raises(AuthenticationError) as caught:
                await service.authenticate(name, password, address="t")
            errors.append(caught.value)
        return errors

    wrong, unknown = with_service(home, scenario)
    assert wrong.kind is unknown.kind is AuthFailure.BAD_CREDENTIALS
    assert (wrong.message, wrong.hint) == (unknown.message, unknown.hint)


def test_login_name_is_case_insensitive_and_principal_carries_the_role(home: Path) -> None:
    async def scenario(service: UserService) -> Principal:
        await _add(service, "Ref1", Role.REFERRING, "DOE^JOHN")
        return await service.authenticate("ref1", PASSWORD, address="t")

    assert with_service(home, scenario) == Principal("Ref1", Role.REFERRING, "DOE^JOHN")


def test_lockout_after_consecutive_failures_refuses_even_the_right_password(home: Path) -> None:
    clock = Clock()

    async def scenario(service: UserService) -> None:
        await _add(service)
        kinds = []
        for _ in range(3):
            with pytest.raises(AuthenticationError) as caught:
                await service.authenticate("rad1", "wrong password!", address="t")
            kinds.append(caught.value.kind)
        assert kinds == [AuthFailure.BAD_CREDENTIALS] * 2 + [AuthFailure.LOCKED_OUT]
        with pytest.raises(AuthenticationError) as caught:
            await service.authenticate("rad1", PASSWORD, address="t")
        assert caught.value.kind is AuthFailure.LOCKED_OUT
        clock.advance(9 * 60)
        with pytest.raises(AuthenticationError) as caught:
            await service.authenticate("rad1", PASSWORD, address="t")
        assert caught.value.kind is AuthFailure.LOCKED_OUT
        clock.advance(61)
        assert (await service.authenticate("rad1", PASSWORD, address="t")).name == "rad1"

    with_service(home, scenario, clock=clock, max_failed_logins=3, lockout_minutes=10.0)


def test_a_success_restarts_the_failure_count(home: Path) -> None:
    async def scenario(service: UserService) -> None:
        await _add(service)
        for _ in range(2):
            for _ in range(2):
                with pytest.raises(AuthenticationError) as caught:
                    await service.authenticate("rad1", "wrong password!", address="t")
                assert caught.value.kind is AuthFailure.BAD_CREDENTIALS
            await service.authenticate("rad1", PASSWORD, address="t")

    with_service(home, scenario, max_failed_logins=3)


def test_failed_logins_of_an_unknown_user_lock_that_name_alone(home: Path) -> None:
    async def scenario(service: UserService) -> None:
        await _add(service)
        kinds = []
        for _ in range(3):
            with pytest.raises(AuthenticationError) as caught:
                await service.authenticate("RAD2", "wrong password!", address="t")
            kinds.append(caught.value.kind)
        # As an account would: the lock does not tell that no account has the name.
        assert kinds == [AuthFailure.BAD_CREDENTIALS] + [AuthFailure.LOCKED_OUT] * 2
        await service.authenticate("rad1", PASSWORD, address="t")

    with_service(home, scenario, max_failed_logins=2)


async def _kind(service: UserService, name: str, password: str, address: str
                ) -> AuthFailure | None:
    """How a login ends: None if admitted, else the refusal's kind."""
    try:
        await service.authenticate(name, password, address=address)
    except AuthenticationError as exc:
        return exc.kind
    return None


def test_failed_logins_across_names_throttle_their_address_alone_until_the_window_ends(
        home: Path) -> None:
    # One common password tried against many names: before, each name had its own
    # max_failed_logins checks and the address none, so every name was checked.
    clock = Clock()

    async def scenario(service: UserService) -> None:
        await _add(service)
        sprayed = [await _kind(service, f"user{n}", "Winter2026!Winter", "10.0.0.9")
                   for n in range(8)]
        assert sprayed == [AuthFailure.BAD_CREDENTIALS] * 4 + [AuthFailure.THROTTLED] * 4
        # Refused unchecked, the right password too; the wait is what is left of the window.
        with pytest.raises(AuthenticationError) as caught:
            await service.authenticate("rad1", PASSWORD, address="10.0.0.9")
        assert caught.value.kind is AuthFailure.THROTTLED
        assert caught.value.retry_after == 600
        assert await _kind(service, "rad1", PASSWORD, "10.0.0.10") is None  # another client
        clock.advance(599)
        assert await _kind(service, "rad1", PASSWORD, "10.0.0.9") is AuthFailure.THROTTLED
        clock.advance(1)
        assert await _kind(service, "rad1", PASSWORD, "10.0.0.9") is None

    with_service(home, scenario, clock=clock, max_failed_logins=3, lockout_minutes=10.0,
                 failed_logins_per_address=4)


def test_a_parallel_burst_from_one_address_gets_no_more_checks_than_its_limit(
        home: Path) -> None:
    # All arrive before the first check ends: each passed the throttle on arrival and
    # waits for a hash slot; those served once the address is throttled are not checked.
    async def scenario(service: UserService) -> list[AuthFailure | None]:
        return list(await asyncio.gather(*(
            _kind(service, f"user{n}", "Winter2026!Winter", "10.0.0.9") for n in range(12))))

    kinds = with_service(home, scenario, failed_logins_per_address=3)
    assert kinds.count(AuthFailure.BAD_CREDENTIALS) <= 3 + 1  # one more in the other slot
    assert kinds.count(AuthFailure.THROTTLED) >= 12 - 4


def test_the_address_throttle_keeps_a_bounded_number_of_addresses() -> None:
    throttle = AddressThrottle(limit=1, window=600.0)
    for n in range(login_throttle.ADDRESSES + 1):
        throttle.fail(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 1000.0)
    assert throttle.retry_after("10.0.0.0", 1000.0) == 0  # the least recently failed: gone
    assert throttle.retry_after("10.0.0.1", 1000.0) == 600


def test_an_ipv6_host_taking_fresh_addresses_is_throttled_by_its_64_not_its_neighbours(
        home: Path) -> None:
    # An IPv6 host holds a whole /64 and may use a fresh address for every try: before,
    # each address had its own count (a real run against serve: 40 addresses of one
    # /64, 40 passwords checked against a limit of 4).
    net = "2001:db8:1:2::"

    async def scenario(service: UserService) -> None:
        await _add(service)
        one_host = [await _kind(service, f"user{n}", "Winter2026!Winter", net + "10")
                    for n in range(3)]
        assert one_host == [AuthFailure.BAD_CREDENTIALS] * 2 + [AuthFailure.THROTTLED]
        assert await _kind(service, "rad1", PASSWORD, net + "11") is None  # its neighbour
        # The /64 may fail HOSTS_PER_NETWORK (5) times the address's 2: 2 above, 8 here.
        fresh = [await _kind(service, f"user{n}", "Winter2026!Winter", f"{net}{n + 256:x}")
                 for n in range(10)]
        assert fresh == [AuthFailure.BAD_CREDENTIALS] * 8 + [AuthFailure.THROTTLED] * 2
        assert await _kind(service, "rad1", PASSWORD, net + "12") is AuthFailure.THROTTLED
        assert await _kind(service, "rad1", PASSWORD, "2001:db8:1:3::10") is None

    with_service(home, scenario, failed_logins_per_address=2)


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(home: Path) -> None:
    async def scenario(service: UserService) -> list[AuthFailure | None]:
        await _add(service)
        return [await _kind(service, f"user{n}", "Winter2026!Winter", address)
                for n, address in enumerate(["::ffff:10.0.0.9", "10.0.0.9", "::ffff:10.0.0.9",
                                             "10.0.0.9"])]

    assert with_service(home, scenario, failed_logins_per_address=2) == [
        AuthFailure.BAD_CREDENTIALS] * 2 + [AuthFailure.THROTTLED] * 2


def test_failing_from_many_other_addresses_does_not_free_an_address_at_its_limit() -> None:
    # Before, the least recently failed address was forgotten first, whatever its count:
    # a client failing from ADDRESSES others (fresh IPv6 addresses) freed a throttled one.
    throttle = AddressThrottle(limit=2, window=600.0)
    for _ in range(2):
        throttle.fail("192.0.2.7", 1000.0)
    for n in range(login_throttle.ADDRESSES):
        throttle.fail(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 1001.0)
    assert throttle.retry_after("192.0.2.7", 1001.0) == 599


def test_a_failed_logins_per_address_of_zero_turns_the_throttle_off(home: Path) -> None:
    async def scenario(service: UserService) -> set[AuthFailure | None]:
        return {await _kind(service, f"user{n}", "Winter2026!Winter", "10.0.0.9")
                for n in range(6)}

    assert with_service(home, scenario, failed_logins_per_address=0) == {
        AuthFailure.BAD_CREDENTIALS}


def test_a_remembered_password_ends_when_another_process_changes_it(home: Path,
                                                                    tmp_path: Path) -> None:
    new_password = password_file(tmp_path, OTHER_PASSWORD)

    async def scenario(service: UserService) -> None:
        await _add(service)
        for _ in range(2):  # the second check is answered from memory
            await service.authenticate("rad1", PASSWORD, address="t")
        run_pacs_edge("users", "passwd", "rad1", "--password-file", str(new_password),
                      "--home", str(home))
        with pytest.raises(AuthenticationError) as caught:
            await service.authenticate("rad1", PASSWORD, address="t")
        assert caught.value.kind is AuthFailure.BAD_CREDENTIALS
        await service.authenticate("rad1", OTHER_PASSWORD, address="t")
        run_pacs_edge("users", "remove", "rad1", "--home", str(home))
        with pytest.raises(AuthenticationError):
            await service.authenticate("rad1", OTHER_PASSWORD, address="t")

    with_service(home, scenario)


def test_a_remembered_password_does_not_pass_a_lockout(home: Path) -> None:
    async def scenario(service: UserService) -> None:
        await _add(service)
        await service.authenticate("rad1", PASSWORD, address="t")
        for _ in range(2):
            with pytest.raises(AuthenticationError):
                await service.authenticate("rad1", "wrong password!", address="t")
        with pytest.raises(AuthenticationError) as caught:
            await service.authenticate("rad1", PASSWORD, address="t")
        assert caught.value.kind is AuthFailure.LOCKED_OUT

    with_service(home, scenario, max_failed_logins=2)


# --- the service: sessions --------------------------------------------------------------

def test_session_ends_after_the_idle_limit(home: Path) -> None:
    clock = Clock()

    async def scenario(service: UserService) -> None:
        await _add(service)
        token = await service.open_session(
            await service.authenticate("rad1", PASSWORD, address="t"), address="t")
        for _ in range(5):  # used every 9 minutes: alive well past the idle limit
            clock.advance(9 * 60)
            assert (await service.session(token)).name == "rad1"
        clock.advance(10 * 60 + 1)
        with pytest.raises(AuthenticationError) as caught:
            await service.session(token)
        assert caught.value.kind is AuthFailure.EXPIRED

    with_service(home, scenario, clock=clock, session_idle_minutes=10.0)


def test_session_ends_after_the_absolute_limit_however_active(home: Path) -> None:
    clock = Clock()

    async def scenario(service: UserService) -> None:
        await _add(service)
        token = await service.open_session(
            await service.authenticate("rad1", PASSWORD, address="t"), address="t")
        for _ in range(7):
            clock.advance(20 * 60)
            await service.session(token)
        clock.advance(20 * 60 + 1)  # 2 h 40 min in, never idle 30 min: past 2.5 h
        with pytest.raises(AuthenticationError) as caught:
            await service.session(token)
        assert caught.value.kind is AuthFailure.EXPIRED

    with_service(home, scenario, clock=clock, session_idle_minutes=30.0,
                 session_max_hours=2.5)


def test_session_opened_before_the_clock_stepped_back_ends(home: Path) -> None:
    # Stepped back five years, a session's idle and absolute limits were measured from
    # times in the future: it stayed valid, never idle, for five years more.
    clock = Clock()

    async def scenario(service: UserService) -> None:
        await _add(service)
        token = await service.open_session(
            await service.authenticate("rad1", PASSWORD, address="t"), address="t")
        clock.advance(-5 * 365 * 86400)
        with pytest.raises(AuthenticationError) as caught:
            await service.session(token)
        assert caught.value.kind is AuthFailure.EXPIRED

    with_service(home, scenario, clock=clock)


def test_a_lockout_set_before_the_clock_stepped_back_ends(home: Path) -> None:
    # Locked while the clock was a year ahead, then NTP corrected it: the lock counted
    # its ten minutes from a year ahead, and the user (and a name no account has) stayed
    # locked out for a year.
    clock = Clock()

    async def scenario(service: UserService) -> None:
        await _add(service)
        for name in ("rad1", "nobody"):
            for _ in range(3):
                await _kind(service, name, "wrong password!", "t")
            assert await _kind(service, name, "wrong password!", "t") is AuthFailure.LOCKED_OUT
        clock.advance(-365 * 86400)
        assert await _kind(service, "rad1", PASSWORD, "t") is None
        assert await _kind(service, "nobody", "wrong password!", "t") is (
            AuthFailure.BAD_CREDENTIALS)

    with_service(home, scenario, clock=clock, max_failed_logins=3, lockout_minutes=10.0)


def test_users_list_shows_no_lockout_set_before_the_clock_stepped_back(home: Path) -> None:
    clock = Clock()
    clock.now = time.time() + 365 * 86400  # the box's clock a year ahead, then corrected

    async def lock(service: UserService) -> None:
        await _add(service)
        for _ in range(service.config.auth.max_failed_logins):
            await _kind(service, "rad1", "wrong password!", "t")

    with_service(home, lock, clock=clock)
    assert users_json(home)[0]["locked_until"] == ""


def test_closed_session_and_removed_user_end_sessions(home: Path) -> None:
    async def scenario(service: UserService) -> None:
        await _add(service)
        principal = await service.authenticate("rad1", PASSWORD, address="t")
        first = await service.open_session(principal, address="t")
        second = await service.open_session(principal, address="t")
        assert first != second
        await service.close_session(first)
        with pytest.raises(AuthenticationError):
            await service.session(first)
        assert (await service.session(second)).name == "rad1"
        await service.remove_user("rad1")
        with pytest.raises(AuthenticationError):
            await service.session(second)

    with_service(home, scenario)


def test_session_tokens_are_stored_hashed(home: Path) -> None:
    async def scenario(service: UserService) -> str:
        await _add(service)
        return await service.open_session(
            await service.authenticate("rad1", PASSWORD, address="t"), address="t")

    token = with_service(home, scenario)
    index = load_config(home).index.path
    with sqlite3.connect(f"file:{index}?mode=ro", uri=True) as conn:
        stored = [row[0] for row in conn.execute("SELECT token_hash FROM user_sessions")]
    assert len(stored) == 1 and token not in stored[0] and len(stored[0]) == 64
    for path in index.parent.glob(index.name + "*"):
        assert token.encode() not in path.read_bytes()


@pytest.mark.parametrize("token", ["", "x" * 300, "not-a-session", "\x00"])
def test_session_refuses_garbage_tokens(home: Path, token: str) -> None:
    async def scenario(service: UserService) -> AuthFailure:
        with pytest.raises(AuthenticationError) as caught:
            await service.session(token)
        return caught.value.kind

    assert with_service(home, scenario) is AuthFailure.EXPIRED


def test_add_user_refuses_bad_role_arguments_in_the_service(home: Path) -> None:
    async def scenario(service: UserService) -> None:
        with pytest.raises(UserError):
            await service.add_user("r", Role.REFERRING, PASSWORD, referring_name="^ ^")
        with pytest.raises(UserError):
            await service.add_user("r", Role.ADMIN, PASSWORD, referring_name="DOE^JOHN")
        assert await service.list_users() == []

    with_service(home, scenario)


# --- roles and scope --------------------------------------------------------------------

@pytest.mark.parametrize(("study_value", "visible"), [
    ("DOE^JOHN", True), ("doe^john", True), ("DOE^JOHN^^^", True), (" DOE ^JOHN", True),
    ("DOE^JOHN=ドウ^ジョン", True), ("DOE^JANE", False), ("DOE", False), ("", False),
    ("SMITH^JOHN", False), ("DOE^JOHN^A", False),
])
def test_referring_user_sees_only_matching_referring_physician(study_value: str,
                                                               visible: bool) -> None:
    assert Principal("ref1", Role.REFERRING, "Doe^John").may_see(study_value) is visible


@pytest.mark.parametrize("role", [Role.ADMIN, Role.RADIOLOGIST])
def test_admins_and_radiologists_see_every_study(role: Role) -> None:
    principal = Principal("u", role, "")
    assert principal.sees_all() and principal.may_see("") and principal.may_see("ANY^ONE")


def test_referring_user_without_a_name_sees_nothing() -> None:
    principal = Principal("ref1", Role.REFERRING, "")
    assert not principal.sees_all() and not principal.may_see("") and person_name_key("^") == ()
