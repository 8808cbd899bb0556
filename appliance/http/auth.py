"""Who is asking: the one middleware every request of the web server passes through.

A request carries its user in one of two ways, both checked by the user service
(appliance/services/users.py), never here:
- HTTP Basic (``Authorization: Basic``), for tools and scripts speaking DICOMweb;
  only ever over TLS, since the server speaks nothing else;
- the session cookie ``__Host-pacs_edge_session`` the login page sets (web browsers).
  The ``__Host-`` prefix makes browsers take it only host-only, Secure, Path=/: another
  site of the domain (``Domain=hospital.org`` from wiki.hospital.org) can neither set
  nor shadow it, so it cannot plant its own session in a user's browser.

The Principal the service answers is put on the request (``request[PRINCIPAL]``)
for the routes, which hand it to the services (scope is a service rule). A
request without valid credentials gets, under /dicom-web, ``401`` with a
``WWW-Authenticate: Basic`` challenge (a browser gets one that opens no password
dialog: _from_browser), and elsewhere a redirect to the login page; HTTP Basic
from an address with too many failed logins gets ``429`` with Retry-After (the
user service's per-address throttle). Paths registered with `allow_anonymous`
(the login page itself, launch links, the health probes and /metrics) pass
without a user, and only to the route registered at that very path: a request
the router hands to another route (HEAD /launch, which has no HEAD, or /metrics
with metrics off, both fell through to the viewer's catch-all and were served
its page without a login) needs a user.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol
from urllib.parse import quote

from aiohttp import web

from appliance.base.errors import AuthenticationError, AuthFailure, IndexUnavailable, OutOfSpace
from appliance.services.access import Principal

log = logging.getLogger(__name__)

SESSION_COOKIE = "__Host-pacs_edge_session"
DICOMWEB_PREFIX = "/dicom-web"
LOGIN_PATH = "/login"
REALM = 'Basic realm="pacs-edge", charset="UTF-8"'
# The 401 challenge for a browser: a scheme no browser answers itself, so the page (OHIF)
# gets the 401 and the browser opens no password dialog of its own.
BROWSER_REALM = 'Session realm="pacs-edge"'
# Retry-After of a 503 for a condition of the box that passes (a full disk, a recall
# that did not finish in time): the client tries the same request again later.
RETRY_AFTER_SECONDS = "60"
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
_ANONYMOUS: web.AppKey[set[str]] = web.AppKey("pacs_edge_anonymous_paths", set)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Authenticator(Protocol):
    """The part of appliance.services.users.UserService this middleware needs."""

    async def authenticate(self, name: str, password: str, *, address: str) -> Principal: ...

    async def session(self, token: str) -> Principal: ...


def allow_anonymous(app: web.Application, *paths: str) -> None:
    """Let requests for exactly these paths through without a user (login, launch), to
    the routes registered at these paths (not to a catch-all that also matches them)."""
    app.setdefault(_ANONYMOUS, set()).update(paths)


def client_address(request: web.BaseRequest) -> str:
    """The peer's IP address (behind a reverse proxy: the proxy's; see docs/web.md)."""
    return request.remote or ""


def address_in(address: str, networks: Iterable[str]) -> bool:
    """Whether `address` (an IPv4-mapped IPv6 one as its IPv4) is in one of `networks`."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def middleware(users: Authenticator) -> Any:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _anonymous(request):
            return await handler(request)
        principal = await _principal(request, users)
        if principal is None:
            return _challenge(request)
        request[PRINCIPAL] = principal
        return await handler(request)

    return authenticate


def _anonymous(request: web.Request) -> bool:
    if request.path not in request.app.get(_ANONYMOUS, ()):
        return False
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical == request.path


async def _principal(request: web.Request, users: Authenticator) -> Principal | None:
    address = client_address(request)
    try:
        basic = _basic_credentials(request.headers.get("Authorization", ""))
        if basic is not None:
            return await users.authenticate(basic[0], basic[1], address=address)
        token = request.cookies.get(SESSION_COOKIE, "")
        if token:
            return await users.session(token)
    except AuthenticationError as exc:
        log.info("http request not authenticated kind=%s address=%s", exc.kind.name, address)
        if exc.kind is AuthFailure.THROTTLED:  # a new challenge would only invite a retry
            raise web.HTTPTooManyRequests(
                text="too many failed logins from this address: try again later\n",
                headers={"Retry-After": str(exc.retry_after)}) from exc
        return None
    except IndexUnavailable as exc:
        raise web.HTTPServiceUnavailable(reason="index unavailable") from exc
    except OutOfSpace as exc:
        # A login (or a session's use) is recorded in the index: on a full disk it cannot
        # be, and the request is refused as the box's condition, never a 500.
        raise web.HTTPServiceUnavailable(text="the box's disk is full: try again later\n",
                                         headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc
    return None


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")  # malformed: checked like a wrong password, so it fails the same way
    name, _, password = decoded.partition(":")
    return name, password


def _challenge(request: web.Request) -> web.StreamResponse:
    if request.path == DICOMWEB_PREFIX or request.path.startswith(DICOMWEB_PREFIX + "/"):
        realm = BROWSER_REALM if _from_browser(request) else REALM
        return web.Response(status=401, text="authentication required\n",
                            headers={"WWW-Authenticate": realm})
    target = request.rel_url.path_qs
    raise web.HTTPSeeOther(f"{LOGIN_PATH}?next={quote(target, safe='')}")


def _from_browser(request: web.Request) -> bool:
    """Whether a request comes from a web browser (Fetch Metadata, which browsers add to
    every request and tools do not, or the session cookie, which only the login page sets).

    A browser answers a Basic challenge with its own password dialog (Chromium does for
    the viewer's fetches once a session has ended) and then sends what was typed there
    with every request to the box until it is closed: logging out left /dicom-web open to
    the next person at a shared workstation. Browsers log in through the login page only.
    """
    return "Sec-Fetch-Mode" in request.headers or SESSION_COOKIE in request.cookies
