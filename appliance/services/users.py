"""Web users: accounts, password logins with lock-out, sessions, launch links.

The rules every edge shares (the login page, HTTP Basic on /dicom-web, the CLI):

- A login is refused with one message whether the user is unknown or the password
  wrong, and it costs the same time either way (a dummy hash for unknown users,
  constant-time comparison), so neither the answer nor its timing tells which.
- [auth] max_failed_logins consecutive failures lock the user for lockout_minutes;
  while locked even the right password is refused (LOCKED_OUT) and not counted, also
  one whose check was under way when the lock came (_settle). A success resets the
  count; `users unlock` and `users passwd` lift a lock. A name no account has locks
  the same way, its spellings in any letter case counted as one as an account's are
  (UnknownNameLocks), so the lock tells no more than the message.
- [auth] failed_logins_per_address wrong passwords from one client address, whatever
  the names, refuse that address's logins unchecked (THROTTLED) for the rest of
  lockout_minutes (login_throttle.py): one client spraying a password across many
  names gets that many checks, not max_failed_logins per name. An IPv6 client's /64
  is counted too (HOSTS_PER_NETWORK times as many), so fresh addresses do not help;
  the right password is refused as well while its address is.
- A session token is 32 random bytes (URL-safe text); only its SHA-256 is stored. A
  session ends after session_idle_minutes without use or session_max_hours after
  login, when the user is removed, and when their password changes. A password is
  admitted, and a login's session opened, in the transaction that checks the stored
  hash is still the one the password was verified against: a login whose check was
  under way when `users passwd` changed the password opens nothing (log_in).
- Launch links (services/launch_links.py) open once: the nonce of a redeemed link is
  committed before the link is honoured.
- HTTP Basic sends the password with every DICOMweb request: a password verified in
  the last few minutes is recognised without another scrypt (VerifiedCredentials),
  for as long as the stored hash is unchanged and the user not locked.

No password, token or name goes to the log: log lines carry a keyed reference of
the user name (logsafe.ref) and the client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import logging
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from appliance.base import logsafe
from appliance.base.config import AuthConfig, Config
from appliance.base.errors import (
    AuthenticationError,
    AuthFailure,
    OutOfSpace,
    PacsEdgeError,
    UserError,
)
from appliance.services import launch_links, passwords
from appliance.services.access import Principal, Role
from appliance.services.login_throttle import AddressThrottle
from appliance.store import database
from appliance.store import user_rows as rows
from appliance.store.clock_steps import STEPPED_BACK_SLACK, still_ahead
from appliance.store.index import Index

if TYPE_CHECKING:
    import sqlite3

    from appliance.audit import Auditor
    from appliance.store.user_rows import UserRow

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_NAME_CHARS = 64
MAX_PASSWORD_CHARS = 1024  # longer input is refused before it is hashed
HASHES_AT_ONCE = 2  # a login storm queues instead of taking every core
LINK_VIA = "launch link"
VERIFIED_SECONDS = 300.0
VERIFIED_ENTRIES = 1024
# Unknown names whose failures are counted; at 2 scrypts at once a guesser needs far
# longer than a lock-out to push one name out by failing with others.
UNKNOWN_NAMES = 50_000
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _principal(user: UserRow) -> Principal:
    return Principal(name=user.name, role=Role(user.role), referring_name=user.referring_name)


def check_name(name: str) -> str:
    """User names: 1-64 printable ASCII characters without spaces or ':' (HTTP Basic
    splits on the first colon)."""
    if not (0 < len(name) <= MAX_NAME_CHARS and name.isascii() and name.isprintable()
            and " " not in name and ":" not in name):
        raise UserError("a user name is 1-64 printable ASCII characters without spaces or ':'",
                        hint="e.g. jdoe or dr.smith")
    return name


def check_account(name: str, role: Role, referring_name: str) -> None:
    """A new account's name and scope, checked before anyone is asked for a password."""
    check_name(name)
    if role is Role.REFERRING and not referring_name.strip("^ "):
        raise UserError("a referring user needs the name their studies carry",
                        hint="add --referring 'LAST^FIRST' (the Referring Physician's "
                        "Name as the RIS writes it)")
    if role is not Role.REFERRING and referring_name:
        raise UserError("--referring is only for --role referring",
                        hint="admins and radiologists see every study")
    if len(referring_name) > 64 * 5 or not referring_name.isprintable():
        raise UserError("--referring is not a person name",
                        hint="'LAST^FIRST' as the studies carry it")


class UserService:
    def __init__(self, index: Index, config: Config, *,
                 clock: Callable[[], float] = time.time,
                 auditor: Auditor | None = None) -> None:
        """`clock` is the wall clock (epoch seconds); tests pass one they can advance.
        `auditor` records logins and link uses (serve passes its own; the CLI, which
        only edits accounts and audits those edits itself, passes none)."""
        self.index = index
        self.config = config
        self._clock = clock
        self._auditor = auditor
        self._hashing = asyncio.Semaphore(HASHES_AT_ONCE)
        self._link_key: bytes | None = None
        self._verified = VerifiedCredentials()
        self._unknown_names = UnknownNameLocks()
        self._addresses = AddressThrottle(limit=config.auth.failed_logins_per_address,
                                          window=config.auth.lockout_minutes * 60)

    # --- accounts (the CLI) ------------------------------------------------------------

    def check_password(self, password: str) -> None:
        shortest = self.config.auth.min_password_length
        if len(password) < shortest:
            raise UserError(f"the password is shorter than {shortest} characters",
                            hint="choose a longer one ([auth] min_password_length)")
        if len(password) > MAX_PASSWORD_CHARS:
            raise UserError(f"the password is longer than {MAX_PASSWORD_CHARS} characters")

    async def add_user(self, name: str, role: Role, password: str, *,
                       referring_name: str = "") -> None:
        check_account(name, role, referring_name)
        self.check_password(password)
        hashed = await self._hash(password)
        now = self._clock()
        await self._write(lambda conn: rows.insert_user(
            conn, name=name, role=role.value, referring_name=referring_name,
            password_hash=hashed, now=now))
        log.info("user added user=%s role=%s", logsafe.ref(name), role.value)

    async def list_users(self) -> list[UserRow]:
        return await database.run_sync(self.index.reader, rows.list_users)

    async def require_user(self, name: str, *, exists: bool) -> None:
        """Refuse a change before its password is asked for: `name` must exist (passwd)
        or must not (add). The change itself checks again in its transaction."""
        found = await database.run_sync(self.index.reader, rows.find_user, name)
        if exists and found is None:
            raise _unknown(name)
        if not exists and found is not None:
            raise rows.taken(name)

    async def remove_user(self, name: str) -> None:
        if not await self._write(lambda conn: rows.delete_user(conn, name)):
            raise _unknown(name)
        log.info("user removed user=%s", logsafe.ref(name))

    async def set_password(self, name: str, password: str) -> None:
        """New password; every session of the user ends and a lock-out is lifted."""
        self.check_password(password)
        hashed = await self._hash(password)
        now = self._clock()
        if not await self._write(lambda conn: rows.set_password(conn, name, hashed, now)):
            raise _unknown(name)
        log.info("user password changed user=%s", logsafe.ref(name))

    async def unlock(self, name: str) -> None:
        if not await self._write(lambda conn: rows.unlock(conn, name)):
            raise _unknown(name)
        log.info("user unlocked user=%s", logsafe.ref(name))

    # --- logins and sessions (the web) -------------------------------------------------

    async def authenticate(self, name: str, password: str, *, address: str,
                           via: str = "HTTP Basic") -> Principal:
        """The user's Principal, or AuthenticationError BAD_CREDENTIALS / LOCKED_OUT.

        Audited (User Authentication) whatever the edge: every refusal, and each success
        that needed a password check (a password recognised from memory is the same
        client's next request, not a new login)."""
        return (await self._audited(name, password, address=address, via=via))[0]

    async def log_in(self, name: str, password: str, *, address: str,
                     via: str) -> tuple[Principal, str]:
        """authenticate, and a new session for the user: (principal, token).

        The session row is written in the transaction that admits the password, after
        checking the stored hash is still the one the password was verified against:
        before, a login whose scrypt was running when `users passwd` ended the user's
        sessions was admitted with the old password and its session outlived the
        change (a client logging in again and again with a leaked password kept its
        access through the reset)."""
        token = secrets.token_urlsafe(32)
        principal, _ = await self._audited(name, password, address=address, via=via,
                                           session=_token_hash(token))
        log.info("session opened user=%s address=%s", logsafe.ref(principal.name), address)
        return principal, token

    async def _audited(self, name: str, password: str, *, address: str, via: str,
                       session: str = "") -> tuple[Principal, bool]:
        try:
            principal, checked = await self._authenticate(name, password, address=address,
                                                          session=session)
        except AuthenticationError as exc:
            # A throttled address's refusals are audited without the name typed: they are
            # windowed per address then, not one record per name a sprayer tries.
            typed = "" if exc.kind is AuthFailure.THROTTLED else name
            await self._audit(typed, address, failure=exc.kind.value, via=via)
            raise
        if checked:
            await self._audit(principal.name, address, via=via)
        return principal, checked

    async def _authenticate(self, name: str, password: str, *, address: str,
                            session: str = "") -> tuple[Principal, bool]:
        """`session`: the token hash of a session to open with the admission (a login);
        a password recognised from memory is then checked again, not recalled."""
        now = self._clock()
        self._check_address(address, now)
        user = None
        if 0 < len(name) <= MAX_NAME_CHARS:
            user = await database.run_sync(self.index.reader, rows.find_user, name)
        lockout = self.config.auth.lockout_minutes * 60
        if user is not None and still_ahead(user.locked_until, now, lockout):
            raise _locked_out(user, address)
        if user is None and self._unknown_names.locked(name, now, lockout):
            raise _name_locked_out(name, address)
        if len(password) > MAX_PASSWORD_CHARS:
            password = password[:MAX_PASSWORD_CHARS + 1]  # wrong anyway; bounded cost
        if not session and user is not None and self._verified.recall(user, password, now):
            return _principal(user), False
        async with self._hashing:
            # Again: a burst from one address all passed the check above on arrival.
            self._check_address(address, self._clock())
            if user is None:
                await asyncio.to_thread(passwords.dummy_password_check, password)
                ok = False
            else:
                ok = await asyncio.to_thread(passwords.verify_password, password,
                                             user.password_hash)
        if not ok:  # counted as it ends (`now` is when it arrived: windows must not go back)
            self._addresses.fail(address, self._clock())
        auth = self.config.auth
        if user is None:
            verdict = self._unknown_names.fail(name, now=now, limit=auth.max_failed_logins,
                                               lockout_seconds=auth.lockout_minutes * 60)
        else:
            checked = user
            verdict = await self._write(lambda conn: _settle(conn, checked, ok, now=now,
                                                             auth=auth, session=session))
        if verdict is _Verdict.ADMITTED:
            assert user is not None
            self._verified.remember(user, password, now)
            return _principal(user), True
        if verdict is _Verdict.LOCKED:
            raise _name_locked_out(user.name if user else name, address)
        locked = verdict is _Verdict.REFUSED_AND_LOCKED
        log.warning("login refused reason=bad_credentials user=%s address=%s locked=%s",
                    logsafe.ref(user.name if user else name), address, locked)
        if locked:
            raise AuthenticationError(AuthFailure.LOCKED_OUT,
                                      hint="wait, or ask an administrator to unlock the user")
        raise AuthenticationError(AuthFailure.BAD_CREDENTIALS,
                                  hint="check the user name and password")

    def _check_address(self, address: str, now: float) -> None:
        wait = self._addresses.retry_after(address, now)
        if wait:
            raise AuthenticationError(AuthFailure.THROTTLED, retry_after=wait,
                                      hint="too many failed logins from this address: wait")

    async def open_session(self, principal: Principal, *, address: str) -> str:
        """A new session for an authenticated principal; returns the token (the cookie)."""
        user = await database.run_sync(self.index.reader, rows.find_user, principal.name)
        if user is None:
            raise AuthenticationError(AuthFailure.BAD_CREDENTIALS)
        token = secrets.token_urlsafe(32)
        digest, user_id, now, auth = _token_hash(token), user.id, self._clock(), self.config.auth

        def store(conn: sqlite3.Connection) -> None:
            rows.prune_sessions(conn, idle_before=now - auth.session_idle_minutes * 60,
                                created_before=now - auth.session_max_hours * 3600)
            rows.insert_session(conn, token_hash=digest, user_id=user_id, now=now)

        await self._write(store)
        log.info("session opened user=%s address=%s", logsafe.ref(user.name), address)
        return token

    async def session(self, token: str) -> Principal:
        """The Principal of a live session; AuthenticationError EXPIRED otherwise.

        Use is recorded (for the idle limit) at most once a minute per session, not on
        every request: a viewer fetching hundreds of frames costs no hundred commits."""
        expired = AuthenticationError(AuthFailure.EXPIRED, hint="log in again")
        if not token or len(token) > 256:
            raise expired
        digest = _token_hash(token)
        found = await database.run_sync(self.index.reader, rows.find_session, digest)
        if found is None:
            raise expired
        now, auth = self._clock(), self.config.auth
        idle = auth.session_idle_minutes * 60
        if (now - found.last_seen_at > idle
                or now - found.created_at > auth.session_max_hours * 3600
                # Used "after now": before the wall clock stepped back. Its limits would
                # count from the future, for as long as the step.
                or found.last_seen_at > now + STEPPED_BACK_SLACK):
            await self._write(lambda conn: rows.delete_session(conn, digest))
            raise expired
        if now - found.last_seen_at >= min(60.0, idle / 10):
            # On a full disk the use cannot be recorded: the session still admits (reads
            # go on, as C-FIND and C-GET do), its idle clock running from the last record.
            with contextlib.suppress(OutOfSpace):
                await self._write(lambda conn: rows.touch_session(conn, digest, now))
        return _principal(found.user)

    async def close_session(self, token: str) -> None:
        if token and len(token) <= 256:
            digest = _token_hash(token)
            await self._write(lambda conn: rows.delete_session(conn, digest))

    # --- launch links ------------------------------------------------------------------

    def link_key(self, *, create: bool = False) -> bytes:
        """The home's link key (kept once read); `create` makes it if missing (signing)."""
        if self._link_key is None:
            self._link_key = launch_links.load_link_key(self.config.home, create=create)
        return self._link_key

    async def sign_link(self, name: str, study_uid: str, *, ttl_seconds: int) -> str:
        """A launch-link token for an existing user; the TTL is bounded by the config."""
        longest = self.config.auth.link_max_ttl_minutes * 60
        if not 0 < ttl_seconds <= longest:
            raise UserError(f"a link may live 1 s to {longest / 60:g} minutes",
                            hint="shorten --ttl, or raise [auth] link_max_ttl_minutes")
        if await database.run_sync(self.index.reader, rows.find_user, name) is None:
            raise _unknown(name)
        try:
            return launch_links.sign(self.link_key(create=True), user=name, study_uid=study_uid,
                                     ttl_seconds=ttl_seconds, now=self._clock())
        except ValueError:
            raise UserError("not a valid Study Instance UID",
                            hint="digits and dots, at most 64 characters") from None

    async def redeem_link(self, url_token: str, *, address: str) -> tuple[Principal, str]:
        """(principal, study UID) of a genuine, unexpired, unused link; the link is used up.
        AuthenticationError LINK_INVALID, LINK_EXPIRED or LINK_USED otherwise. Audited."""
        try:
            principal, study_uid = await self._redeem_link(url_token, address=address)
        except AuthenticationError as exc:
            await self._audit("", address, failure=exc.kind.value, via=LINK_VIA)
            raise
        await self._audit(principal.name, address, via=LINK_VIA)
        return principal, study_uid

    async def _redeem_link(self, url_token: str, *, address: str) -> tuple[Principal, str]:
        now = self._clock()
        try:
            key = self.link_key()
        except PacsEdgeError as exc:  # no key yet: this box signed no link it can check
            log.error("launch link key unusable error=%s", exc.message)
            raise AuthenticationError(AuthFailure.LINK_INVALID) from None
        claims = launch_links.verify(key, url_token, now=now,
                                     max_ttl_seconds=self.config.auth.link_max_ttl_minutes * 60)
        user = await database.run_sync(self.index.reader, rows.find_user, claims.user)
        if user is None:
            log.warning("link refused reason=unknown_user address=%s", address)
            raise AuthenticationError(AuthFailure.LINK_INVALID)
        if user.created_at >= claims.issued_at + 1:  # iat is whole seconds, this box's clock
            # Issued to an earlier account of this name, since removed: the new account
            # may be someone else (a name given again), with another role or scope.
            log.warning("link refused reason=account_newer_than_link user=%s address=%s",
                        logsafe.ref(user.name), address)
            raise AuthenticationError(AuthFailure.LINK_INVALID)
        fresh = await self._write(lambda conn: rows.redeem_nonce(
            conn, claims.nonce, expires_at=claims.expires_at, now=now))
        if not fresh:
            log.warning("link refused reason=used user=%s address=%s", logsafe.ref(user.name),
                        address)
            raise AuthenticationError(AuthFailure.LINK_USED,
                                      hint="a launch link opens once: ask for a new one")
        return _principal(user), claims.study_uid

    # --- helpers -----------------------------------------------------------------------

    async def _audit(self, name: str, address: str, *, failure: str = "",
                     via: str) -> None:
        if self._auditor is not None:  # a refusal is flushed at once: off the loop
            await asyncio.to_thread(self._auditor.user_authentication, name, address,
                                    failure=failure, via=via)

    async def _hash(self, password: str) -> str:
        async with self._hashing:
            return await asyncio.to_thread(passwords.hash_password, password)

    async def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        assert self.index.writer is not None, "index is not open"
        return await self.index.writer.submit_sync(operation)


class VerifiedCredentials:
    """Passwords this process verified recently, so HTTP Basic (sent with every DICOMweb
    request) costs one scrypt per user and VERIFIED_SECONDS, not one per request.

    Kept in memory only, keyed by an HMAC of name and password under a per-process
    random key (the password is not kept), and valid only while the user's stored hash
    is still the one it was checked against: `users passwd` or `users remove` in another
    process ends it at the next request. A hit only ever happens for the right password,
    so its speed tells a guesser nothing.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def _digest(self, user: UserRow, password: str) -> bytes:
        text = f"{user.id}\0{password}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, text, hashlib.sha256).digest()

    def recall(self, user: UserRow, password: str, now: float) -> bool:
        entry = self._entries.get(self._digest(user, password))
        return (entry is not None and still_ahead(entry[1], now, VERIFIED_SECONDS)
                and hmac.compare_digest(entry[0], user.password_hash))

    def remember(self, user: UserRow, password: str, now: float) -> None:
        self._entries[self._digest(user, password)] = (user.password_hash,
                                                       now + VERIFIED_SECONDS)
        while len(self._entries) > VERIFIED_ENTRIES:
            self._entries.popitem(last=False)


class UnknownNameLocks:
    """The lock-out of names no account has, in memory: the count and lock a user's row
    keeps (user_rows.record_failure), so that after max_failed_logins wrong tries a name
    is LOCKED_OUT for lockout_minutes whether an account has it or not.

    Before, only accounts locked: a few wrong passwords for a name told whether it
    existed (an account's next try said "locked", at once; an unknown name's said
    "wrong", after a full scrypt), where the message and its timing were meant to tell
    nothing. Bounded to UNKNOWN_NAMES names, the least recently failed forgotten first;
    a restart forgets them (an account's lock is kept).
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # failures, until

    @staticmethod
    def _key(name: str) -> str:
        # Folded as the users table compares names (SQLite NOCASE: ASCII letters only),
        # so "NOBODY" and "nobody" are one name here as "RAD1" and "rad1" are one account.
        # Before, each spelling was counted apart: case variants of an unknown name never
        # locked it while an account's did, which told which names exist.
        return name[:MAX_NAME_CHARS + 1].translate(_ASCII_LOWER)  # longer: no account's

    def locked(self, name: str, now: float, lockout_seconds: float) -> bool:
        entry = self._entries.get(self._key(name))
        return entry is not None and still_ahead(entry[1], now, lockout_seconds)

    def fail(self, name: str, *, now: float, limit: int, lockout_seconds: float) -> _Verdict:
        """Count one failure, as _settle does for an account: LOCKED if the name was
        locked meanwhile (not counted), REFUSED_AND_LOCKED if this one locks it."""
        key = self._key(name)
        failures, until = self._entries.pop(key, (0, 0.0))
        verdict = (_Verdict.LOCKED if still_ahead(until, now, lockout_seconds)
                   else _Verdict.REFUSED)
        if verdict is _Verdict.REFUSED:
            failures += 1
            if failures >= limit:
                failures, until, verdict = 0, now + lockout_seconds, _Verdict.REFUSED_AND_LOCKED
        self._entries[key] = (failures, until)
        while len(self._entries) > UNKNOWN_NAMES:
            self._entries.popitem(last=False)
        return verdict


class _Verdict(enum.Enum):
    """How a checked password ends, decided against the user's lock as it is when the
    outcome is recorded."""

    ADMITTED = enum.auto()
    REFUSED = enum.auto()             # wrong, counted
    REFUSED_AND_LOCKED = enum.auto()  # wrong, counted, and the failure that locked the user
    LOCKED = enum.auto()              # locked meanwhile: refused and not counted, right or wrong


def _settle(conn: sqlite3.Connection, user: UserRow, ok: bool, *, now: float,
            auth: AuthConfig, session: str = "") -> _Verdict:
    """Record a password check against the user's lock as it is now, in one writer
    transaction.

    Guesses sent at once all pass the lock check on arrival, then wait for a hash slot:
    those that finish after the user was locked are refused LOCKED_OUT and not counted,
    right or wrong, as if they had come later. Before, a burst had every guess checked
    whatever max_failed_logins says, and a right guess in it was let in.

    A password checked against a hash that is no longer the user's (`users passwd`
    ran during the check) is refused, not counted. `session`: the token hash of the
    login's session, written here with the admission, so that no password change can
    fall between the two."""
    current = rows.find_user(conn, user.name)
    if current is None or current.id != user.id or current.password_hash != user.password_hash:
        return _Verdict.REFUSED
    if still_ahead(current.locked_until, now, auth.lockout_minutes * 60):
        return _Verdict.LOCKED
    if ok:
        rows.record_success(conn, user.id, now=now)
        if session:
            rows.prune_sessions(conn, idle_before=now - auth.session_idle_minutes * 60,
                                created_before=now - auth.session_max_hours * 3600)
            rows.insert_session(conn, token_hash=session, user_id=user.id, now=now)
        return _Verdict.ADMITTED
    locked = rows.record_failure(conn, user.id, now=now, limit=auth.max_failed_logins,
                                 lockout_seconds=auth.lockout_minutes * 60)
    return _Verdict.REFUSED_AND_LOCKED if locked else _Verdict.REFUSED


def _locked_out(user: UserRow, address: str) -> AuthenticationError:
    return _name_locked_out(user.name, address)


def _name_locked_out(name: str, address: str) -> AuthenticationError:
    log.warning("login refused reason=locked_out user=%s address=%s", logsafe.ref(name),
                address)
    return AuthenticationError(AuthFailure.LOCKED_OUT,
                               hint="wait, or ask an administrator to unlock the user")


def _unknown(name: str) -> UserError:
    return UserError(f"no user {name!r}", hint="`pacs-edge users list` shows the users")
