"""The 503 a DICOMweb read gets while its study is recalled, or after its recall failed.

The answer says what the viewer (viewer_recall.py) and any other client need to
wait sensibly, in two headers:

- `PACS-Edge-Recall: <reason>[; expect=<seconds>]`: names the 503 as a recall's
  (any 503 without it is another condition of the box: a full disk, too many
  connections). Reasons:

  - `recalling; expect=1800`: the packs are on an online tier (Hot, Cool, Cold)
    and are read at once; Retry-After: 2.
  - `rehydrating; expect=57600`: a pack is on the Archive tier, which Azure must
    rehydrate first (`[sync] rehydrate_priority` standard: up to 15 h;
    `expect=10800` at high: under an hour for most packs); Retry-After:
    `[sync] rehydrate_poll_seconds` (60 s).
  - `failed`: the recall failed (the sync agent's log says why); Retry-After: 60.

- `Retry-After`: when asking again is useful. A recall from an online tier lands
  within minutes, and the box holds each ask up to `[http] recall_wait_seconds`,
  so a short one; an Archive rehydration is checked by the sync agent every
  `[sync] rehydrate_poll_seconds`, so asking more often gains nothing.

`expect` is how long the box expects the recall to take at most, counted from the
first such answer: the viewer tells the user and stops asking after it. 16 h for
an Archive rehydration: Azure's Standard priority takes up to 15 hours, and the
recall's own download follows; 3 h at High priority, which Azure gives for most
blobs under 10 GB within the hour, but does not promise.
"""

from __future__ import annotations

import math

from aiohttp import web

from appliance.base.config import Config
from appliance.http.auth import RETRY_AFTER_SECONDS
from appliance.services.web_retrieve import Located

RECALL_HEADER = "PACS-Edge-Recall"
RECALL_RETRY_SECONDS = 2  # a recall still running: the next ask waits for it again
RECALL_EXPECT_SECONDS = 30 * 60  # Hot/Cool/Cold: a large study within minutes
REHYDRATE_EXPECT_SECONDS = {"standard": 16 * 3600,  # Archive: up to 15 h, then the download
                            "high": 3 * 3600}  # most packs within the hour; not promised


def recall_unavailable(found: Located, config: Config) -> web.HTTPServiceUnavailable:
    """The 503 for a located read whose study is not on local disk (found.unavailable)."""
    if not found.recall_pending:
        return web.HTTPServiceUnavailable(
            text="the study is not on local disk and its recall from the cloud failed\n",
            headers={"Retry-After": RETRY_AFTER_SECONDS, RECALL_HEADER: "failed"})
    if found.recall_from_archive:
        retry = max(1, math.ceil(config.sync.rehydrate_poll_seconds))
        return web.HTTPServiceUnavailable(
            text="the study is in the cloud's Archive tier: its recall takes hours\n",
            headers={"Retry-After": str(retry),
                     RECALL_HEADER: "rehydrating; expect="
                                    f"{REHYDRATE_EXPECT_SECONDS[config.sync.rehydrate_priority]}"})
    return web.HTTPServiceUnavailable(
        text="the study is being recalled from the cloud: ask again in a few seconds\n",
        headers={"Retry-After": str(RECALL_RETRY_SECONDS),
                 RECALL_HEADER: f"recalling; expect={RECALL_EXPECT_SECONDS}"})
