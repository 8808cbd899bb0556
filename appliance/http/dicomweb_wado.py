"""WADO-RS (PS3.18 10.4): instances, frames and bulk data of stored studies.

- `GET /studies/{s}[/series/{se}[/instances/{i}]]`: multipart/related;
  type="application/dicom", one part per instance, each the stored Part 10 file
  byte for byte, streamed from disk. The stored transfer syntax is sent when the
  Accept header allows it (`transfer-syntax=*`, or that syntax named); without a
  transfer-syntax parameter PS3.18 means Explicit VR Little Endian, and
  instances stored in Implicit VR LE or Deflated are re-encoded to it
  (transcode.py). Nothing else is transcoded: an instance stored in another
  syntax the client does not accept is 406.
- `.../instances/{i}/frames/{n}[,{n}...]`: one part per frame (pixel_frames.py):
  uncompressed frames as application/octet-stream (Explicit VR Little Endian),
  encapsulated ones in their stored syntax, as its image media type
  (image/jpeg, image/jls, image/jp2, image/dicom-rle, ...) or as
  application/octet-stream when `transfer-syntax=*` or that syntax is named.
- `.../instances/{i}/bulkdata/{tag}`: a top-level bulk element's value named by a
  metadata BulkDataURI; Pixel Data answers its frames.

A study that is evicted is recalled first (web_retrieve.py), like C-GET, waiting
up to `[http] recall_wait_seconds`: a recall still running then is 503 with
Retry-After: 2 (ask again: the recall goes on, and the viewer does ask again,
viewer_recall.py), a recall that failed is 503 with Retry-After: 60; a recall that
waits for an Archive-tier rehydration says so, with a longer Retry-After. Each
carries `PACS-Edge-Recall` (recall_answer.py): a 503 without it is some other
condition of the box (a full disk, too many connections), not a recall. A file
gone while the answer streams (its study evicted meanwhile) is recalled and sent
in its place (`_opened`); one that cannot be had cuts the begun answer short. Unknown and
out-of-scope studies are both 404. Every answer that hands out patient data is
audited, and every 404 and 503 too: who, in which role, which study, from where
(the auditor folds a viewer's hundreds of requests into one record per user,
study and address per window: appliance/audit/web_access.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import BinaryIO

from aiohttp import web
from pydicom import dcmread
from pydicom.tag import Tag

from appliance.http import dicomweb_common as common
from appliance.http.dicomweb_media import (
    ANY_SYNTAX,
    DICOM,
    FRAME_MEDIA_TYPES,
    MULTIPART,
    OCTET_STREAM,
    MediaRange,
    MultipartStream,
    file_chunks,
)
from appliance.http.recall_answer import recall_unavailable
from appliance.services.pixel_frames import (
    EXPLICIT_LITTLE,
    PIXEL_TAGS,
    FrameError,
    frame_numbers,
    is_encapsulated,
    read_frames,
)
from appliance.services.transcode import TRANSCODABLE, Transcoded, explicit_little
from appliance.services.web_retrieve import Located, StoredInstance

log = logging.getLogger(__name__)

MAX_FRAMES_PER_REQUEST = 4096
FRAME_READ_BYTES = 16 << 20  # frames held at once while an answer streams (at least one)


def add_routes(app: web.Application) -> None:
    p = f"{common.PREFIX}/studies/{{study}}"
    common.add_get(app, p, retrieve)
    common.add_get(app, f"{p}/series/{{series}}", retrieve)
    instance = f"{p}/series/{{series}}/instances/{{instance}}"
    common.add_get(app, instance, retrieve)
    common.add_get(app, f"{instance}/frames/{{frames}}", frames)
    common.add_get(app, f"{instance}/bulkdata/{{tag}}", bulkdata)


async def locate(request: web.Request, what: str, *, wait: float | None = None,
                 pending_ok: bool = False) -> Located:
    """The request's instances, all on local disk; 404 / 503 otherwise. Audited.
    `wait`: seconds to wait for an evicted study's recall (default: recall_wait_seconds).
    `pending_ok`: a recall still running is answered to the caller, not audited,
    which then answers (and audits) or calls again (dicomweb_metadata: from cache)."""
    study = common.uid(request, "study")
    series = common.uid(request, "series") if "series" in request.match_info else ""
    instance = common.uid(request, "instance") if "instance" in request.match_info else ""
    found = await common.reads(request).locate(common.principal(request), study_uid=study,
                                               series_uid=series, sop_uid=instance,
                                               wait=wait)
    if found is None:
        raise await refused(request, what)
    if pending_ok and found.unavailable and found.recall_pending:
        return found
    user, address = common.who(request)
    auditor = common.services(request).auditor
    if found.unavailable:
        reason = ("study is being recalled" if found.recall_pending
                  else "study could not be recalled")
        await asyncio.to_thread(auditor.web_retrieved, user, address, what=what,
                                study_uids=[study], reason=reason)
        raise recall_unavailable(found, common.services(request).config)
    await asyncio.to_thread(auditor.web_retrieved, user, address, what=what,
                            study_uids=[study], instances=len(found.instances))
    return found


async def refused(request: web.Request, what: str) -> web.HTTPNotFound:
    """The 404 for a study that is unknown or out of the user's scope, audited (a
    referring physician probing studies is what the trail is for)."""
    user, address = common.who(request)
    await asyncio.to_thread(common.services(request).auditor.web_retrieved, user, address,
                            what=what, study_uids=[common.uid(request, "study")],
                            reason="no such study or not in the user's scope")
    return common.not_found()


def accepted_syntaxes(header: str | None) -> set[str]:
    """Transfer syntaxes acceptable for application/dicom parts ("*": any)."""
    found: set[str] = set()
    for media in MediaRange.parse_all(header):
        if media.media_type == MULTIPART and media.part_type in (DICOM, ""):
            found.add(media.transfer_syntax or EXPLICIT_LITTLE)
        elif media.media_type in ("*/*", "multipart/*"):
            found.add(EXPLICIT_LITTLE)
    return found


async def retrieve(request: web.Request) -> web.StreamResponse:
    # Scope first, media types second, on the index's answer before anything is read.
    stored = await stored_syntaxes(request, "instances")
    syntaxes = accepted_syntaxes(request.headers.get("Accept"))
    if not syntaxes:
        raise common.not_acceptable("instances")
    as_stored = ANY_SYNTAX in syntaxes
    if not as_stored and not all(ts in syntaxes or (
            ts in TRANSCODABLE and EXPLICIT_LITTLE in syntaxes) for ts in stored):
        raise common.not_acceptable("an instance in its stored transfer syntax")
    found = await locate(request, "instances")
    stream = MultipartStream(request, DICOM)
    for listed in found.instances:
        item, fh = await _opened(request, listed)
        try:
            transcoded = None
            if not as_stored and item.transfer_syntax not in syntaxes:
                # Implicit VR LE or Deflated, asked for as Explicit VR LE (transcode.py).
                transcoded = await asyncio.to_thread(explicit_little, fh, item.transfer_syntax)
                if transcoded is None:  # the answer has begun: the part goes as it was sent
                    log.warning("wado-rs instance sent in its stored syntax: it cannot be"
                                " transcoded transfer_syntax=%s", item.transfer_syntax)
                    await asyncio.to_thread(fh.seek, 0)
            if transcoded is None:
                await stream.part(f"{DICOM}; transfer-syntax={item.transfer_syntax}",
                                  file_chunks(fh))
            else:
                await stream.part(f"{DICOM}; transfer-syntax={EXPLICIT_LITTLE}",
                                  _transcoded_chunks(transcoded, fh))
        finally:  # also when the client left or a read failed before file_chunks closed it
            await asyncio.to_thread(fh.close)
    return await stream.finish()


async def _transcoded_chunks(transcoded: Transcoded, fh: BinaryIO) -> AsyncIterator[bytes]:
    """A transcoded instance's bytes: its re-encoded head, its pixel value streamed from
    the stored file, its re-encoded tail."""
    yield transcoded.head
    if transcoded.value_length:
        async for chunk in file_chunks(fh, transcoded.value_offset, transcoded.value_length):
            yield chunk
    if transcoded.tail:
        yield transcoded.tail


async def _opened(request: web.Request, item: StoredInstance
                  ) -> tuple[StoredInstance, BinaryIO]:
    """The instance's stored file, open. One gone since it was located (its study evicted
    meanwhile) is asked for again (web_retrieve.py: recalled); when it cannot be had the
    answer, begun, is cut short (the client sees an incomplete multipart answer)."""
    try:
        return item, await asyncio.to_thread(item.path.open, "rb")
    except FileNotFoundError:
        again = await common.reads(request).gone_since_located(item)
        if again is None:
            raise
    return again, await asyncio.to_thread(again.path.open, "rb")


async def stored_syntaxes(request: web.Request, what: str) -> set[str]:
    """Stored syntaxes of what the URL names, from the index; 404 when nothing matches
    or the study is out of the user's scope (checked before any media type, so a 406
    cannot tell a referring physician that a study exists)."""
    index = common.services(request).index
    study = common.uid(request, "study")
    rows = await index.locate(
        study_uids=[study],
        series_uids=[common.uid(request, "series")] if "series" in request.match_info else [],
        sop_uids=[common.uid(request, "instance")] if "instance" in request.match_info else [])
    if not rows or not await common.reads(request).in_scope(common.principal(request), study):
        raise await refused(request, what)
    return {row.transfer_syntax for row in rows}


def frame_part_type(header: str | None, stored: str) -> str | None:
    """The Content-Type of frame parts for an instance stored in `stored`; None: 406."""
    encapsulated = is_encapsulated(stored)
    image_type = FRAME_MEDIA_TYPES.get(stored)
    for media in MediaRange.parse_all(header):
        if media.media_type == MULTIPART:
            part, syntax = media.part_type or OCTET_STREAM, media.transfer_syntax
        elif media.media_type in ("*/*", "multipart/*"):
            part, syntax = OCTET_STREAM, ""
        else:
            continue
        if not encapsulated:
            if part in (OCTET_STREAM, "*/*") and syntax in ("", EXPLICIT_LITTLE, ANY_SYNTAX):
                return f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_LITTLE}"
            continue
        if syntax not in ("", stored, ANY_SYNTAX) and part != OCTET_STREAM:
            continue
        if image_type is not None and MediaRange(part).matches(image_type) and (
                part != OCTET_STREAM and part != "*/*"):
            return f"{image_type}; transfer-syntax={stored}"
        if part in (OCTET_STREAM, "*/*") and syntax in (stored, ANY_SYNTAX):
            return f"{OCTET_STREAM}; transfer-syntax={stored}"
    return None


async def frames(request: web.Request) -> web.StreamResponse:
    numbers = _frame_numbers(request.match_info["frames"])
    return await _send_frames(request, numbers, "frames")


async def _send_frames(request: web.Request, numbers: Sequence[int] | None, what: str
                       ) -> web.StreamResponse:
    (stored,) = await stored_syntaxes(request, what)
    part_type = frame_part_type(request.headers.get("Accept"), stored)
    if part_type is None:
        raise common.not_acceptable("frames in the stored transfer syntax")
    found = await locate(request, what)
    item = found.instances[0]
    try:
        if numbers is None:  # all frames (bulk data of Pixel Data), however many
            numbers = await asyncio.to_thread(frame_numbers, item.path)
        # Read before the answer begins: the first frame, and with it the highest asked
        # for, so that a number past the end (or a file cut short before it) is a 404.
        highest = numbers[-1] if isinstance(numbers, range) else max(numbers)
        first = await asyncio.to_thread(read_frames, item.path, item.transfer_syntax,
                                        list(dict.fromkeys((numbers[0], highest))))
    except FrameError as exc:
        raise web.HTTPNotFound(text=f"{exc.message}\n") from exc
    stream = MultipartStream(request, part_type.split(";")[0])
    await stream.part(part_type, first.frames[0])
    # The rest a few at a time, never all at once: one URL may name a large frame 4096 times.
    batch = max(1, FRAME_READ_BYTES // max(1, len(first.frames[0])))
    for start in range(1, len(numbers), batch):
        read = await asyncio.to_thread(read_frames, item.path, item.transfer_syntax,
                                       numbers[start:start + batch])
        for frame in read.frames:
            await stream.part(part_type, frame)
    return await stream.finish()


def _frame_numbers(text: str) -> list[int]:
    parts = text.split(",")
    if len(parts) > MAX_FRAMES_PER_REQUEST or not all(
            p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
        raise web.HTTPBadRequest(text="frames must be a comma-separated list of numbers\n")
    numbers = [int(p) for p in parts]
    if any(n < 1 for n in numbers):
        raise web.HTTPBadRequest(text="frame numbers start at 1\n")
    return numbers


async def bulkdata(request: web.Request) -> web.StreamResponse:
    text = request.match_info["tag"]
    if len(text) != 8 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise web.HTTPBadRequest(text="bulk data is named by an 8-digit hex tag\n")
    tag = Tag(int(text, 16))
    if tag in PIXEL_TAGS:  # Pixel Data (or a parametric map's float pixels): every frame
        return await _send_frames(request, None, "bulkdata")
    await stored_syntaxes(request, "bulkdata")
    if not any(m.media_type in ("*/*", "multipart/*") or (
            m.media_type == MULTIPART and m.part_type in (OCTET_STREAM, "", "*/*"))
               for m in MediaRange.parse_all(request.headers.get("Accept"))):
        raise common.not_acceptable("bulk data")
    found = await locate(request, "bulkdata")
    value = await asyncio.to_thread(_element_bytes, found.instances[0].path, tag)
    if value is None:
        raise web.HTTPNotFound(text="the instance has no readable bulk data element with"
                                    " that tag\n")
    stream = MultipartStream(request, OCTET_STREAM)
    await stream.part(OCTET_STREAM, value)
    return await stream.finish()


_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def _element_bytes(path: object, tag: Tag) -> bytes | None:
    """The bulk data value of element `tag`; None when there is none, or none pydicom can
    read (instances are stored as sent: an unknown VR raises NotImplementedError)."""
    ds = dcmread(path, stop_before_pixels=True, specific_tags=[tag])  # type: ignore[arg-type]
    try:
        element = ds.get(tag)
    except Exception:
        return None
    if element is None or element.VR not in _BULK_VRS or not isinstance(
            element.value, bytes | bytearray):
        return None
    return bytes(element.value)
