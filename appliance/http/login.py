"""The login page, logout, and launch links: how a browser gets a session.

    GET  /login            a plain HTML form (no script)
    POST /login            name + password -> session cookie, 303 to `next` (same origin);
                           a form that stalls for [http] idle_timeout is 408; 429 with
                           Retry-After from an address with too many failed logins
    POST /logout           ends the session, clears the cookie, 303 to /login
    GET  /launch?t=TOKEN   redeems a launch link (services/launch_links.py) -> session
                           cookie, then opens /viewer?StudyInstanceUIDs=<uid>

The rules (passwords, lock-out, sessions, links) are UserService's; this module
translates. The session cookie is ``__Host-pacs_edge_session``: Secure, HttpOnly,
SameSite=Strict, Path=/, Max-Age = [auth] session_max_hours (the server also ends
it after session_idle_minutes without use). Each login makes a new token (no
session fixation).

Cross-site request forgery: SameSite=Strict keeps the cookie off requests other
sites start, and POSTs are refused unless their Origin (or, without one, their
Referer) is this origin, so another site cannot log a browser in as someone else
or log it out.

A launch link comes from another site (the EHR), and a browser does not send a
SameSite=Strict cookie on a redirect that continues a cross-site navigation.
/launch therefore answers a small page that moves on to the viewer itself (a
meta refresh, and a link): that navigation starts on this origin, so the new
cookie goes with it. The page and the login form are no-store, never framed,
and send no Referer off the box (the token must not leak).

Every login, failed login and link use is audited by UserService, logouts
here (PS3.15 User Authentication); log lines carry no name, password or token.
"""

from __future__ import annotations

import asyncio
import html
import logging
from urllib.parse import quote, urlsplit

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiDictProxy

from appliance.audit import Auditor
from appliance.base.errors import AuthenticationError, AuthFailure, IndexUnavailable
from appliance.http import auth
from appliance.services.users import UserService

log = logging.getLogger(__name__)

LOGIN_PATH = auth.LOGIN_PATH
LOGOUT_PATH = "/logout"
LAUNCH_PATH = "/launch"
VIEWER_PATH = "/viewer"
MAX_FIELD_CHARS = 1024
FORM_VIA = "login page"
_USERS: web.AppKey[UserService] = web.AppKey("pacs_edge_login_users", UserService)
_AUDITOR: web.AppKey[Auditor] = web.AppKey("pacs_edge_login_auditor", Auditor)
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline';"
                               " form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_MESSAGES = {
    AuthFailure.BAD_CREDENTIALS: "Wrong user name or password.",
    AuthFailure.LOCKED_OUT: "Too many failed attempts: this account is locked for a while."
                            " Try again later or ask an administrator.",
    AuthFailure.THROTTLED: "Too many failed logins from this computer. Try again later.",
    AuthFailure.LINK_INVALID: "This link is not valid.",
    AuthFailure.LINK_EXPIRED: "This link has expired.",
    AuthFailure.LINK_USED: "This link was already used: a link opens once.",
}


def add_routes(app: web.Application, users: UserService, *, auditor: Auditor) -> None:
    """Register /login, /logout and /launch (the first and last without a session)."""
    app[_USERS] = users
    app[_AUDITOR] = auditor
    app.router.add_get(LOGIN_PATH, login_form)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_post(LOGOUT_PATH, logout)
    # No HEAD: a link checker's HEAD must not use up a one-time link.
    app.router.add_get(LAUNCH_PATH, launch, allow_head=False)
    auth.allow_anonymous(app, LOGIN_PATH, LAUNCH_PATH)


def safe_next(target: str) -> str:
    """Where to go after login: a path on this origin, else the viewer's start page."""
    if (not target.startswith("/") or target.startswith(("//", "/\\"))
            or any(ord(c) < 0x20 or c == "\\" for c in target) or len(target) > 2048):
        return "/"
    return target


def _page(title: str, body: str, *, status: int = 200, head: str = "") -> web.Response:
    return web.Response(
        status=status, content_type="text/html", charset="utf-8", headers=_HEADERS,
        text=f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{head}"
             f"<meta name=\"viewport\" content=\"width=device-width\">"
             f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;"
             f"max-width:22em;margin:4em auto}}label,input,button{{display:block;width:100%;"
             f"margin:.3em 0}}.error{{color:#b00}}</style></head><body>{body}</body></html>\n")


def _form(next_path: str, *, error: str = "", status: int = 200) -> web.Response:
    notice = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    response = _page("pacs-edge: log in", (
        f"<h1>pacs-edge</h1>{notice}"
        f'<form method="post" action="{LOGIN_PATH}">'
        f'<input type="hidden" name="next" value="{html.escape(next_path)}">'
        '<label for="name">User name</label>'
        '<input id="name" name="name" autocomplete="username" required autofocus>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password"'
        ' autocomplete="current-password" required>'
        '<button type="submit">Log in</button></form>'), status=status)
    # Under no-referrer a browser sends `Origin: null` with the form's POST, which
    # same_origin() refuses: nobody could log in. same-origin still tells no other site.
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def same_origin(request: web.Request) -> bool:
    """Whether a state-changing request comes from a page of this origin: its Origin
    header, or without one its Referer, must name https://<the Host it was sent to>."""
    claimed = request.headers.get("Origin") or request.headers.get("Referer") or ""
    if not claimed or claimed == "null":
        return False
    parts = urlsplit(claimed)
    host = (request.host or "").lower()
    netloc = parts.netloc.lower()
    if host.endswith(":443"):
        host = host[:-4]
    if netloc.endswith(":443"):
        netloc = netloc[:-4]
    return parts.scheme == "https" and bool(netloc) and netloc == host


def _set_session(response: web.StreamResponse, request: web.Request, token: str) -> None:
    response.set_cookie(auth.SESSION_COOKIE, token, path="/", secure=True, httponly=True,
                        samesite="Strict",
                        max_age=int(request.app[_USERS].config.auth.session_max_hours * 3600))


async def _audit_logout(request: web.Request, name: str) -> None:
    await asyncio.to_thread(request.app[_AUDITOR].user_authentication, name,
                            auth.client_address(request), logout=True, via=FORM_VIA)


async def login_form(request: web.Request) -> web.StreamResponse:
    return _form(safe_next(request.query.get("next", "/")))


async def _read_form(request: web.Request) -> MultiDictProxy[str | bytes | web.FileField]:
    """The posted form, read within [http] idle_timeout as STOW-RS reads its upload: a
    body that stalls is 408 (aiohttp itself never gives up on one), a body that is not
    a form (a broken chunk, a bad multipart boundary) is 400."""
    try:
        async with asyncio.timeout(request.app[_USERS].config.http.idle_timeout):
            return await request.post()
    except TimeoutError as exc:
        raise web.HTTPRequestTimeout(text="the request body stalled\n") from exc
    except (RequestPayloadError, ValueError) as exc:
        raise web.HTTPBadRequest(text="the request body is not a form\n") from exc


async def login(request: web.Request) -> web.StreamResponse:
    if not same_origin(request):
        log.warning("login refused reason=cross_origin address=%s", auth.client_address(request))
        return _page("Refused", "<p>Log in from this site's own login page.</p>", status=403)
    form = await _read_form(request)
    name, password, target = (str(form.get(key, ""))[:MAX_FIELD_CHARS + 1]
                              for key in ("name", "password", "next"))
    target = safe_next(target)
    users, address = request.app[_USERS], auth.client_address(request)
    try:
        _, token = await users.log_in(name, password, address=address, via=FORM_VIA)
    except AuthenticationError as exc:
        if exc.kind is AuthFailure.THROTTLED:
            response = _form(target, error=_MESSAGES[exc.kind], status=429)
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        return _form(target, error=_MESSAGES.get(exc.kind, exc.message), status=401)
    except IndexUnavailable:
        return _form(target, error="The server cannot check logins right now; try again.",
                     status=503)
    old = request.cookies.get(auth.SESSION_COOKIE, "")
    if old:
        await users.close_session(old)
    response = web.HTTPSeeOther(target, headers=_HEADERS)
    _set_session(response, request, token)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    if not same_origin(request):
        return _page("Refused", "<p>Log out from this site's own pages.</p>", status=403)
    principal = request[auth.PRINCIPAL]
    token = request.cookies.get(auth.SESSION_COOKIE, "")
    if token:
        await request.app[_USERS].close_session(token)
    await _audit_logout(request, principal.name)
    response = web.HTTPSeeOther(LOGIN_PATH, headers=_HEADERS)
    response.del_cookie(auth.SESSION_COOKIE, path="/", secure=True, httponly=True,
                        samesite="Strict")
    return response


async def launch(request: web.Request) -> web.StreamResponse:
    users, address = request.app[_USERS], auth.client_address(request)
    try:
        principal, study_uid = await users.redeem_link(request.query.get("t", ""),
                                                       address=address)
        token = await users.open_session(principal, address=address)
    except AuthenticationError as exc:
        message = _MESSAGES.get(exc.kind, exc.message)
        return _page("pacs-edge: link refused", (
            f"<h1>pacs-edge</h1><p class=\"error\">{html.escape(message)}</p>"
            f"<p>Open the study again from your EHR, or <a href=\"{LOGIN_PATH}\">log in"
            "</a>.</p>"), status=401)
    except IndexUnavailable:
        return _page("pacs-edge", "<p>The server is busy; try the link again.</p>",
                     status=503)
    old = request.cookies.get(auth.SESSION_COOKIE, "")
    if old:  # the browser was logged in (perhaps as someone else): that session ends
        await users.close_session(old)
    viewer = html.escape(f"{VIEWER_PATH}?StudyInstanceUIDs={quote(study_uid, safe='')}")
    response = _page("pacs-edge: opening the study",
                     f'<p><a href="{viewer}">Open the study</a></p>',
                     head=f'<meta http-equiv="refresh" content="0;url={viewer}">')
    _set_session(response, request, token)
    return response
