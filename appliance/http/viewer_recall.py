"""What the viewer shows while a study it opens is recalled from the cloud.

A DICOMweb read of an evicted study waits up to `[http] recall_wait_seconds` for
its recall (dicomweb_wado.locate), then answers 503 with Retry-After while the
recall goes on. OHIF gives up on a series whose metadata request failed: the
viewport kept its loading bar for ever, said nothing, and did not show the study
once it was back; only a reload did.

OHIF hands every failed DICOMweb request to `window.config.httpErrorHandler`
(OHIF 3 app: errorHandler.getHTTPErrorHandler; a frame's failure comes from
cornerstone's IMAGE_LOAD_FAILED event as an Error whose message alone names the
URL and status), and the box writes that config
(viewer.app_config_js), so the fix is this script, appended to app-config.js.
Only the box's recall answers count: a 503 that carries `PACS-Edge-Recall`
(dicomweb_wado.RECALL_HEADER); any other 503 (a full disk, too many connections)
is left to OHIF's ordinary error display. A frame's Error carries no headers, so
the script wraps `window.fetch` (cornerstone's streaming loader calls the global
fetch) and remembers the URLs answered with a recall 503. On the first recall
answer of a study (or series) it:

- `failed`: says the study could not be retrieved from the archive, to reload the
  page later or tell IT, and asks nothing more;
- `recalling`: shows a status line over the viewer: the study is being
  retrieved from the archive and opens by itself, with the time waited so far;
- asks again, each time after the answer's Retry-After (1 to 60 s): for the
  series' (or study's) metadata, or for a frame the same frame (a study whose
  metadata was cached answers its metadata at once, during the recall: only its
  frames say when the recall is done); the box holds each ask up to
  recall_wait_seconds, so the answer comes as the recall lands;
- reloads the page once that answers 200: the viewer route names the study, so
  OHIF opens it again, from the metadata cache;
- keeps OHIF's "Something went wrong" pop-up away for a recall answer: OHIF's
  error boundary shows it for every unhandled promise rejection, and a failed
  frame load is one; the script's own listener, registered first, stops those
  whose reason is a recall answer (others still reach OHIF);
- stops after GIVE_UP_MS, when the recall fails meanwhile, or at any answer other
  than 200 or 503, saying so.

Plain DOM and fetch (the page's own origin and session cookie); no PHI shown.
"""

from __future__ import annotations

from appliance.http.dicomweb_wado import RECALL_HEADER

GIVE_UP_MINUTES = 30

RECALL_SCRIPT = """/* pacs-edge: a study being recalled from the cloud (viewer_recall.py). */
(function () {
  var root = window.location.origin + '/dicom-web';
  var giveUpMs = GIVE_UP_MINUTES * 60 * 1000;
  var target = /^\\/studies\\/([0-9.]+)(?:\\/series\\/([0-9.]+))?/;
  var header = 'RECALL_HEADER';
  var recalls = {};  // URL -> the box's recall header, for a frame's Error (no headers)
  var waiting = false;
  var fetched = window.fetch;
  window.fetch = function () {
    return fetched.apply(window, arguments).then(function (response) {
      var said = response.status === 503 && response.headers.get(header);
      if (said && response.url.indexOf(root + '/studies/') === 0) {
        recalls[response.url] = said;
      }
      return response;
    });
  };
  function notice(text) {
    var box = document.getElementById('pacs-edge-recall');
    if (!box) {
      box = document.createElement('div');
      box.id = 'pacs-edge-recall';
      box.setAttribute('role', 'status');
      box.style.cssText = 'position:fixed;top:64px;left:50%;transform:translateX(-50%);'
        + 'z-index:10000;max-width:640px;padding:12px 20px;border-radius:6px;'
        + 'background:#0b3d91;color:#fff;font:16px sans-serif;text-align:center';
      document.body.appendChild(box);
    }
    box.textContent = text;
  }
  function clock(ms) {
    var s = Math.floor(ms / 1000);
    return Math.floor(s / 60) + ':' + ('0' + (s % 60)).slice(-2);
  }
  function retryAfter(value) {
    var n = parseInt(value, 10);
    return Math.min(60, Math.max(1, isNaN(n) ? 5 : n)) * 1000;
  }
  function reason(said) {
    return String(said || '').split(';')[0].trim();
  }
  var lost = 'This study could not be retrieved from the archive. Reload the page'
    + ' later to try again; if this keeps happening, tell IT.';
  // What a failed request was: URL, status, and the box's recall header if it is a
  // recall answer. OHIF passes an Error with `request` (its XHR) or, for a streamed
  // frame, an Error whose message alone names the URL and status (IMAGE_LOAD_FAILED);
  // the XHR frame loader rejects with the XHR itself.
  function answer(error) {
    var request = error && (error.request || error);
    if (!request || typeof request.getResponseHeader !== 'function') {
      request = null;
    }
    var url = (request && request.responseURL) || '';
    var status = error && (error.status || (request && request.status));
    var said = request ? request.getResponseHeader(header) : '';
    var named = !url && error && /Couldn't retrieve (\\S+) got status (\\d+)/.exec(
      String(error.message));
    if (named) {
      url = named[1];
      status = parseInt(named[2], 10);
      said = recalls[url];
    }
    return {url: url, status: status, request: request, said: status === 503 && said};
  }
  // OHIF's error boundary turns every unhandled rejection into its "Something went
  // wrong" pop-up, a failed frame's among them; a recall answer has the notice instead.
  // Registered before OHIF's listener (app-config.js runs first), so it can stop it.
  window.addEventListener('unhandledrejection', function (event) {
    if (answer(event.reason).said) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  });
  window.config.httpErrorHandler = function (error) {
    var failed = answer(error);
    var request = failed.request;
    var url = failed.url;
    var said = failed.said;
    var match = url.indexOf(root + '/studies/') === 0 && target.exec(url.slice(root.length));
    if (!said || !match || waiting) {
      return;
    }
    waiting = true;
    if (reason(said) === 'failed') {
      notice(lost);
      return;
    }
    // A frame asks for itself again: a study's cached metadata answers 200 while its
    // recall still runs (dicomweb_metadata), its frames only once the recall is done.
    var frames = url.indexOf('/frames/') > 0 || url.indexOf('/bulkdata/') > 0;
    var probe = frames ? url : root + '/studies/' + match[1]
      + (match[2] ? '/series/' + match[2] : '') + '/metadata';
    var accept = frames ? 'multipart/related; type="application/octet-stream";'
      + ' transfer-syntax=*' : 'application/dicom+json';
    var started = Date.now();
    var text = 'This study is being retrieved from the archive. It opens here by itself'
      + ' when it is ready (waiting ';
    var ticker = setInterval(function () {
      notice(text + clock(Date.now() - started) + ').');
    }, 1000);
    notice(text + '0:00).');
    function stop(message) {
      clearInterval(ticker);
      notice(message);
    }
    function ask() {
      if (Date.now() - started > giveUpMs) {
        stop('The study is still not back from the archive after ' + clock(giveUpMs)
          + '. Reload the page to keep waiting; if this keeps happening, tell IT.');
        return;
      }
      fetched(probe, {credentials: 'same-origin', headers: {Accept: accept}})
        .then(function (response) {
          if (response.ok) {
            stop('The study is back from the archive: opening it.');
            window.location.reload();
          } else if (reason(response.headers.get(header)) === 'failed') {
            stop(lost);
          } else if (response.status === 503) {
            setTimeout(ask, retryAfter(response.headers.get('Retry-After')));
          } else {
            stop('The study could not be opened (HTTP ' + response.status
              + '). Reload the page to try again.');
          }
        }, function () {
          setTimeout(ask, 5000);
        });
    }
    setTimeout(ask, retryAfter(request ? request.getResponseHeader('Retry-After') : ''));
  };
})();
""".replace("GIVE_UP_MINUTES", str(GIVE_UP_MINUTES)).replace("RECALL_HEADER", RECALL_HEADER)
