"""What the viewer does when its session ends while it is open: go to the login page.

A session ends while a radiologist reads (the idle limit, a logout in another tab,
`users passwd`). The viewer is a single-page application: it does not navigate, so the
box's `303` to /login (auth.py) never shows. Its next requests fail instead:
/dicom-web answers `401` (a series not yet loaded, the study list), and a file of the
viewer loaded on first use (the PDF viewport's stylesheet, say) is redirected to the
login page, which the browser refuses as a script or a style. OHIF showed the first as
a viewport that stays empty and the second as a black page (its error boundary): a
broken viewer, and no word that logging in again would help.

This script, appended to app-config.js before anything else wraps `window.fetch`
(viewer_recall.py), sends the page to `/login?next=<the viewer URL>` (login.safe_next
keeps it on this origin), once, when:

- a request of this origin, by fetch or XMLHttpRequest (OHIF's DICOMweb client,
  cornerstone's frame loaders), is answered `401`: only a request without valid
  credentials is (an out-of-scope study is `404`);
- a script or stylesheet of this origin fails to load and asking for it again, without
  following redirects, is redirected or `401`: with a session it would be `200`.

After the login the viewer opens again on the same study. No PHI is shown.
"""

from __future__ import annotations

SESSION_SCRIPT = """/* pacs-edge: the session ends while the viewer is open (viewer_session.py). */
(function () {
  var origin = window.location.origin;
  var leaving = false;
  function ours(url) {
    return typeof url === 'string' && url.indexOf(origin + '/') === 0;
  }
  function toLogin() {
    if (leaving) {
      return;
    }
    leaving = true;
    var here = window.location.pathname + window.location.search;
    window.location.assign('/login?next=' + encodeURIComponent(here));
  }
  var fetched = window.fetch;
  window.fetch = function () {
    return fetched.apply(window, arguments).then(function (response) {
      if (response.status === 401 && ours(response.url)) {
        toLogin();
      }
      return response;
    });
  };
  var xhr = window.XMLHttpRequest && window.XMLHttpRequest.prototype;
  var send = xhr && xhr.send;
  if (send) {
    xhr.send = function () {
      this.addEventListener('loadend', function () {
        if (this.status === 401 && ours(this.responseURL)) {
          toLogin();
        }
      });
      return send.apply(this, arguments);
    };
  }
  // A resource's load error does not bubble: it is seen in the capture phase only.
  window.addEventListener('error', function (event) {
    var element = event.target;
    var url = element && (element.tagName === 'SCRIPT' ? element.src
      : element.tagName === 'LINK' ? element.href : '');
    if (!ours(url)) {
      return;
    }
    fetched(url, {credentials: 'same-origin', redirect: 'manual', cache: 'no-store'})
      .then(function (response) {
        if (response.type === 'opaqueredirect' || response.status === 401) {
          toLogin();
        }
      }, function () {});
  }, true);
})();
"""
