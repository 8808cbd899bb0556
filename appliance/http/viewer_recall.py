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
(recall_answer.py); any other 503 (a full disk, too many connections)
is left to OHIF's ordinary error display. A frame's Error carries no headers, so
the script wraps `window.fetch` (cornerstone's streaming loader calls the global
fetch) and remembers the URLs answered with a recall 503. On the first recall
answer of a study (or series) it:

- `failed`: says the study could not be retrieved from the archive, to reload the
  page later or tell IT, and asks nothing more;
- `recalling`: shows a status line over the viewer: the study is being
  retrieved from the archive and opens by itself, with the time waited so far;
- `rehydrating` (a pack on the cloud's Archive tier): says so plainly: this can
  take hours, the user can close the page and come back (the study opens by
  itself if the page stays open), with the time waited so far;
- asks again, each time after the answer's Retry-After (1 s to 1 h; the box sizes
  it to the case): for the series' (or study's) metadata, or for a frame the same
  frame (a study whose metadata was cached answers its metadata at once, during
  the recall: only its frames say when the recall is done); the box holds each
  ask up to recall_wait_seconds, so the answer comes as the recall lands;
- reloads the page once that answers 200: the viewer route names the study, so
  OHIF opens it again, from the metadata cache;
- keeps OHIF's "Something went wrong" pop-up away for a recall answer: OHIF's
  error boundary shows it for every unhandled promise rejection, and a failed
  frame load is one; the script's own listener, registered first, stops those
  whose reason is a recall answer (others still reach OHIF);
- stops once the answer's `expect` (seconds, from the first answer: 30 min for a
  recall, 16 h for an Archive rehydration) has passed, when the recall fails
  meanwhile, or at any answer other than 200 or 503, saying so.

Plain DOM and fetch (the page's own origin and session cookie); no PHI shown.
"""

from __future__ import annotations

from appliance.http.recall_answer import RECALL_HEADER

RECALL_SCRIPT = """/* pacs-edge: a study being recalled from the cloud (viewer_recall.py). */
(function () {
  var root = window.location.origin + '/dicom-web';
  var target = /^\\/studies\\/([0-9.]+)(?:\\/series\\/([0-9.]+))?/;
  var header = 'RECALL_HEADER';
  // URL -> the box's recall answer {said, retry}, for a frame's Error (no headers)
  var recalls = {};
  var waiting = false;
  var fetched = window.fetch;
  window.fetch = function () {
    return fetched.apply(window, arguments).then(function (response) {
      var said = response.status === 503 && response.headers.get(header);
      if (said && response.url.indexOf(root + '/studies/') === 0) {
        recalls[response.url] = {said: said, retry: response.headers.get('Retry-After')};
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
  function two(n) {
    return ('0' + n).slice(-2);
  }
  function clock(ms) {
    var s = Math.floor(ms / 1000);
    var h = Math.floor(s / 3600);
    return h ? h + ':' + two(Math.floor(s / 60) % 60) + ':' + two(s % 60)
      : Math.floor(s / 60) + ':' + two(s % 60);
  }
  function retryAfter(value) {
    var n = parseInt(value, 10);
    return Math.min(3600, Math.max(1, isNaN(n) ? 5 : n)) * 1000;
  }
  function reason(said) {
    return String(said || '').split(';')[0].trim();
  }
  function expectMs(said) {
    var found = /expect=(\\d+)/.exec(String(said || ''));
    return (found ? parseInt(found[1], 10) : 1800) * 1000;
  }
  var lost = 'This study could not be retrieved from the archive. Reload the page'
    + ' later to try again; if this keeps happening, tell IT.';
  var texts = {
    recalling: 'This study is being retrieved from the archive. It opens here by itself'
      + ' when it is ready (waiting ',
    rehydrating: 'This study is being retrieved from long-term archive storage: this can'
      + ' take hours. You can close this page and come back later; if you leave it open,'
      + ' the study opens here by itself when it is ready (waiting '
  };
  // What a failed request was: URL, status, and the box's recall answer if it is one.
  // OHIF passes an Error with `request` (its XHR) or, for a streamed frame, an Error
  // whose message alone names the URL and status (IMAGE_LOAD_FAILED); the XHR frame
  // loader rejects with the XHR itself.
  function answer(error) {
    var request = error && (error.request || error);
    if (!request || typeof request.getResponseHeader !== 'function') {
      request = null;
    }
    var url = (request && request.responseURL) || '';
    var status = error && (error.status || (request && request.status));
    var said = request ? request.getResponseHeader(header) : '';
    var retry = request ? request.getResponseHeader('Retry-After') : '';
    var named = !url && error && /Couldn't retrieve (\\S+) got status (\\d+)/.exec(
      String(error.message));
    if (named) {
      url = named[1];
      status = parseInt(named[2], 10);
      said = recalls[url] && recalls[url].said;
      retry = recalls[url] && recalls[url].retry;
    }
    return {url: url, said: status === 503 && said, retry: retry};
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
    var url = failed.url;
    var match = url.indexOf(root + '/studies/') === 0 && target.exec(url.slice(root.length));
    if (!failed.said || !match || waiting) {
      return;
    }
    waiting = true;
    if (reason(failed.said) === 'failed') {
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
    var giveUpMs = expectMs(failed.said);
    var text = texts[reason(failed.said)] || texts.recalling;
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
    setTimeout(ask, retryAfter(failed.retry));
  };
})();
""".replace("RECALL_HEADER", RECALL_HEADER)
