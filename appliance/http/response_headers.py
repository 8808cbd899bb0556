"""Headers every answer of the web server carries, whichever route (or error) made it,
but one: aiohttp's own 400 for a request it cannot parse (docs/security.md says why).

- ``X-Content-Type-Options: nosniff`` on everything: a browser renders an answer only
  as the type it was sent with, so a JSON or text answer holding a hostile value (a
  Patient Name with markup in it, a reflected error text) is never taken for a page.
- ``Strict-Transport-Security: max-age=31536000`` on everything: once a browser has
  reached the box over HTTPS with a certificate it trusts, it never tries plain HTTP
  to that host name again (a user typing ``pacs:8443`` or an old ``http://`` link
  cannot be led to a look-alike on the LAN that takes the password), and a
  certificate error on that name can no longer be clicked through. No
  ``includeSubDomains``: the box speaks for its own name only, not for the hospital's
  other hosts. Browsers take the header only over a connection whose certificate
  they trust, and never for an IP address, so a box reached by address, or with the
  site CA not yet trusted, is as before.
- ``Cache-Control: no-store`` on every /dicom-web answer that does not set its own:
  QIDO matches and metadata carry names, IDs and birth dates, and a shared reading-room
  workstation must not keep them in its browser's disk cache. (Before, only the
  multipart answers of WADO-RS were no-store; QIDO and metadata JSON had no
  Cache-Control at all, and Chromium stores such answers on disk.)

Installed as an `on_response_prepare` signal, not a middleware: the streamed answers
(metadata, WADO-RS) send their headers before the handler returns, and error answers
(404, 405, HTTPException) never pass a middleware's return path as responses. aiohttp
sends the signal only for a request the application routed: its 400 for a request
line or header it cannot parse gets none, and it offers no supported hook for that
answer (aio-libs/aiohttp#3287, #6463). The connection guard's own 503
(https_server.py) spells the headers out.
"""

from __future__ import annotations

from aiohttp import web

from appliance.http.auth import DICOMWEB_PREFIX

NO_STORE = "no-store"
HSTS = "max-age=31536000"  # a year, as RFC 6797 section 11.2 suggests for a steady host


def install(app: web.Application) -> None:
    app.on_response_prepare.append(_add_headers)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Strict-Transport-Security", HSTS)
    path = request.path
    if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
        response.headers.setdefault("Cache-Control", NO_STORE)
