"""STOW-RS (PS3.18 10.5): store instances uploaded as multipart/related application/dicom.

Each part is streamed to a spool file in the store (bounded memory, counted
against `[http] max_request_mb`: a larger upload is 413, announced by
Content-Length or found while reading; a body that stalls for `[http]
idle_timeout`, or trickles in slower than MIN_UPLOAD_RATE, is 408: _Pace): the
box's own File Meta, then the uploaded dataset bytes unchanged, written once
as they arrive; then it goes through the one durable ingest path of C-STORE
(IngestService.ingest_spool: header check, fsync, rename, index commit). The
answer is given only once every stored instance is durable, as a C-STORE
acknowledgement is.

The answer is the PS3.18 Store Instances Response (application/dicom+json):
ReferencedSOPSequence for the stored instances (with their RetrieveURL),
FailedSOPSequence with a FailureReason for the others; 200 when all were
stored, 202 when some failed, 409 when none could be, but 503 with Retry-After
when none could be because the store's disk is full (or read-only): that is
the box's condition, not the request's, and the same upload succeeds later
(PS3.18 gives 409 for a conflict in the request, 503 for a service that is
unavailable). Failure reasons:
0xC000 cannot be understood, 0xA700 out of resources (the disk, or a deflated
data set inflating beyond store.max_inflated_mb), 0xA900 the data set
does not belong to the study of the URL (POST /studies/{study}), 0xC122 its File
Meta names a transfer syntax the box does not take (ingest's rule: stored, it could
be sent back to no DICOM peer). Duplicates are
success (idempotent). A request that is not multipart/related;
type="application/dicom" is 415; a body that is not valid multipart is 400;
one of more than MAX_PARTS parts is 413 at the part past the limit. An Accept
header that admits no JSON answer (only application/dicom+xml, say, which the
box does not write) is 406, before any part is read: the instances would be
stored and the client could not read which.

Storing needs a role that sees every study (admin, radiologist): a referring
physician's upload is 403. Stored instances are audited per study (who, from
where).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage
from pydicom.filereader import read_preamble

from appliance.base import compat
from appliance.base.errors import OutOfSpace, RejectedInstance, Rejection
from appliance.base.metrics import RECEIVED_BYTES
from appliance.base.uids import is_valid_uid, normalise_uid
from appliance.http import dicomweb_common as common
from appliance.http.auth import RETRY_AFTER_SECONDS
from appliance.http.dicomweb_media import CHUNK, DICOM, MULTIPART, MediaRange, accepts_json
from appliance.services.dicom_header import read_header
from appliance.services.ingest import IngestService
from appliance.store.instance_header import InstanceHeader
from appliance.store.spool import SpoolFile

log = logging.getLogger(__name__)

CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
NOT_THIS_STUDY = 0xA900
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18 I.2-2: Referenced Transfer Syntax not supported
_REASONS = {Rejection.OUT_OF_SPACE: OUT_OF_RESOURCES, Rejection.INFLATE_LIMIT: OUT_OF_RESOURCES,
            Rejection.TRANSFER_SYNTAX_NOT_SUPPORTED: TRANSFER_SYNTAX_NOT_SUPPORTED}
HEAD_BYTES = 64 << 10  # of a part, kept in memory to find the end of its File Meta
# Each part costs ~1 KiB of answer whatever its size: without a cap, a body of tiny parts
# within max_request_mb took ~100x its size in memory (and ~0.3 ms of CPU per part).
MAX_PARTS = 20_000
# Bytes per second an upload must average while the box waits for it (_Pace): a thousandth
# of a slow 10 Mbit/s link, a 2 GB upload in 24 days; a trickle of 10 bytes/s is 408.
MIN_UPLOAD_RATE = 1024
_T = TypeVar("_T")


class _Pace:
    """How an upload keeps up: each wait for the client's next bytes ends after `[http]
    idle_timeout` (a stall), and every idle_timeout seconds spent waiting must bring at
    least MIN_UPLOAD_RATE bytes a second. Without the rate, a body trickled in just
    under the idle timeout (10 bytes/s) held a connection and a spool for as long as
    max_request_mb takes at that rate: years. A rate rather than a total deadline:
    a large study over a slow link is legitimate. Only time spent waiting for the
    client counts, never the box's own disk writes and fsyncs between reads."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.waited = 0.0  # seconds spent waiting in this window
        self.received = 0  # bytes the caller counted in this window

    async def wait(self, pending: Awaitable[_T]) -> _T:
        """`pending`'s result; TimeoutError when it stalls or the window is too slow."""
        start = time.monotonic()
        async with asyncio.timeout(self.idle):
            result = await pending
        self.waited += time.monotonic() - start
        if self.waited >= self.idle:
            if self.received < MIN_UPLOAD_RATE * self.idle:
                raise TimeoutError("the upload is slower than MIN_UPLOAD_RATE")
            self.waited, self.received = 0.0, 0
        return result


@dataclass
class _Outcome:
    stored: list[tuple[str, str, InstanceHeader]]  # (class, instance, header)
    failed: list[tuple[str, str, int]]  # (class, instance, reason)
    no_space: int = 0  # of the failed, refused for want of disk space (OutOfSpace)


def add_routes(app: web.Application) -> None:
    app.router.add_post(f"{common.PREFIX}/studies", store)
    app.router.add_post(f"{common.PREFIX}/studies/{{study}}", store)


async def store(request: web.Request) -> web.Response:
    target = common.uid(request, "study") if "study" in request.match_info else ""
    config = common.services(request).config.http
    limit = config.max_request_mb << 20
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text="the upload exceeds [http] max_request_mb\n")
    _check_content_type(request.headers.get("Content-Type", ""))
    if not common.principal(request).may_store():
        user, address = common.who(request)
        await asyncio.to_thread(common.services(request).auditor.web_store_refused, user,
                                address, reason="storing needs the admin or radiologist role",
                                study_uid=target)
        raise web.HTTPForbidden(text="storing needs the admin or radiologist role\n")
    if not accepts_json(request.headers.get("Accept")):  # before a byte of the body is stored
        raise common.not_acceptable("a store (its answer is application/dicom+json)")
    outcome = _Outcome([], [])
    # Instances stored before a later part fails (413, 400, 408) stay stored and audited:
    # each was durable on its own, as over a C-STORE association that is then aborted.
    try:
        reader = MultipartReader(request.headers, request.content)
        budget = [limit]
        pace = _Pace(config.idle_timeout)
        while True:
            part = await pace.wait(reader.next())
            if part is None:
                break
            if len(outcome.stored) + len(outcome.failed) >= MAX_PARTS:
                raise web.HTTPRequestEntityTooLarge(
                    max_size=limit, actual_size=-1,
                    text=f"the upload holds more than {MAX_PARTS} instances: send them in"
                         " several requests\n")
            if not isinstance(part, BodyPartReader):
                raise ValueError("nested multipart is not a DICOM part")
            await _store_part(request, part, target, budget, pace, outcome)
    except TimeoutError as exc:
        raise web.HTTPRequestTimeout(text="the upload stalled or is too slow\n") from exc
    except (ValueError, BadHttpMessage, web.RequestPayloadError) as exc:
        # aiohttp's multipart parser raises ValueError for a malformed body, BadHttpMessage
        # for a part's malformed header (over 128 lines, a line over 8190 bytes, no
        # colon); the body's own decoding (a Content-Encoding it does not hold) arrives
        # as RequestPayloadError. Each is the client's: 400, never a 500.
        raise web.HTTPBadRequest(text="the body is not valid multipart/related\n") from exc
    finally:
        await _audit(request, outcome)
    if not outcome.stored and not outcome.failed:
        raise web.HTTPBadRequest(text="the body holds no instance\n")
    return _answer(request, target, outcome)


def _check_content_type(header: str) -> None:
    (media,) = MediaRange.parse_all(header)[:1] or [MediaRange("")]
    if media.media_type != MULTIPART or media.part_type != DICOM:
        raise web.HTTPUnsupportedMediaType(
            text='STOW-RS takes multipart/related; type="application/dicom"\n')
    if not media.params.get("boundary"):
        raise web.HTTPBadRequest(text="multipart/related without a boundary\n")


async def _store_part(request: web.Request, part: BodyPartReader, target: str,
                      budget: list[int], pace: _Pace, outcome: _Outcome) -> None:
    """Stream one part into a spool: its first HEAD_BYTES are kept to write the box's own
    File Meta (IngestService.start_spool), the dataset bytes after them go to disk as
    they arrive. One write per byte, as for C-STORE; nothing of the part is kept beyond
    one CHUNK in memory."""
    ingest = common.services(request).ingest
    is_dicom = _is_dicom_part(part.headers.get("Content-Type", DICOM))
    head = bytearray()
    first = b""  # the part's first HEAD_BYTES: its File Meta names it (_identity)
    spool: SpoolFile | None = None
    refusal: Rejection | None = None if is_dicom else Rejection.INVALID
    try:
        while True:
            chunk = await pace.wait(part.read_chunk(CHUNK))
            pace.received += len(chunk)
            if not chunk:
                break
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise web.HTTPRequestEntityTooLarge(
                    max_size=common.services(request).config.http.max_request_mb << 20,
                    actual_size=-1, text="the upload exceeds [http] max_request_mb\n")
            if refusal is not None:  # read to its end, store nothing
                continue
            head += chunk
            if spool is None and len(head) < HEAD_BYTES:
                continue
            if spool is None:
                first = bytes(head)
                spool, refusal = await asyncio.to_thread(_start, ingest, first)
            else:
                await asyncio.to_thread(spool.write, bytes(head))
            head.clear()
        if refusal is None and spool is None:  # a part shorter than HEAD_BYTES
            first = bytes(head)
            spool, refusal = await asyncio.to_thread(_start, ingest, first)
        elif spool is not None and head:
            await asyncio.to_thread(spool.write, bytes(head))
    except BaseException:
        if spool is not None:
            await asyncio.to_thread(spool.discard)
        raise
    if spool is None:  # refused (`refusal` says why)
        # A File Meta refused for what it names (its transfer syntax) names the instance.
        named = _file_meta_uids(first) if refusal is not Rejection.INVALID else ("", "")
        outcome.failed.append((*named, _REASONS.get(refusal, CANNOT_UNDERSTAND)))
        return
    await _ingest(request, spool, first, target, outcome)


def _is_dicom_part(content_type: str) -> bool:
    """Whether a part's Content-Type is application/dicom. One that names no media type
    ("," or "application/dicom; q=0", which parse_all drops as an Accept range would
    be) is not: the part fails with 0xC000, the upload goes on."""
    ranges = MediaRange.parse_all(content_type)
    return bool(ranges) and ranges[0].media_type == DICOM


def _start(ingest: IngestService, head: bytes) -> tuple[SpoolFile | None, Rejection | None]:
    """A spool with the box's File Meta and the dataset bytes found in `head`, or why
    there is none: INVALID when `head` does not begin a Part 10 file (or its File Meta
    does not fit in it), else the kind of ingest's refusal of its File Meta."""
    fh = io.BytesIO(head)
    try:
        spool = ingest.start_spool(fh)
    except RejectedInstance as exc:
        return None, exc.kind
    if fh.tell() >= len(head) and len(head) >= HEAD_BYTES:
        spool.discard()  # File Meta of 64 KiB or more: not something a modality writes
        return None, Rejection.INVALID
    spool.write(head[fh.tell():])
    return spool, None


async def _ingest(request: web.Request, spool: SpoolFile, first: bytes, target: str,
                  outcome: _Outcome) -> None:
    """Make the spooled instance durable (the spool is consumed either way)."""
    services = common.services(request)
    RECEIVED_BYTES.labels("dicomweb").inc(spool.size)
    sop_class, sop_uid, study = await asyncio.to_thread(_identity, spool, first,
                                                        services.ingest.max_inflated)
    # An instance whose header cannot be read has no study: ingest refuses it (0xC000).
    if target and study and study != target:
        await asyncio.to_thread(spool.discard)
        outcome.failed.append((sop_class, sop_uid, NOT_THIS_STUDY))
        return
    try:
        result = await services.ingest.ingest_spool(spool, source_ae=_SOURCE)
    except OutOfSpace:
        outcome.failed.append((sop_class, sop_uid, OUT_OF_RESOURCES))
        outcome.no_space += 1
        return
    except RejectedInstance as exc:
        log.info("stow-rs instance refused reason=%s", exc.kind.name)
        outcome.failed.append((sop_class, sop_uid, _REASONS.get(exc.kind, CANNOT_UNDERSTAND)))
        return
    header = result.header
    outcome.stored.append((header.sop_class_uid, header.sop_uid, header))


_SOURCE = "DICOMWEB"


def _identity(spool: SpoolFile, first: bytes, max_inflated: int) -> tuple[str, str, str]:
    """(SOP Class, SOP Instance, Study Instance UID) of an uploaded file. When its header
    cannot be read (the ingest that follows says why it refuses the file), or the spool
    holds none of it (a full disk refused its bytes: the spool gives them back), the
    File Meta's SOP Class and Instance UIDs from the part's `first` bytes, so that the
    failure still names the instance, and no study. Read as ingest reads it: a deflated
    data set is inflated in bounded chunks and refused past `max_inflated`, where
    pydicom's dcmread would inflate a deflate bomb whole, in memory."""
    if spool.error is None:
        try:
            header = read_header(spool.name, max_inflated=max_inflated, fd=spool.read_fd)
        except RejectedInstance:
            pass
        else:
            return header.sop_class_uid, header.sop_uid, header.study_uid
    return (*_file_meta_uids(first), "")


def _file_meta_uids(first: bytes) -> tuple[str, str]:
    """Media Storage SOP Class and Instance UIDs of the File Meta at the start of an
    uploaded part (IngestService.start_spool found it there: it fits in HEAD_BYTES),
    each "" unless it is a valid UID: an answer never echoes what is not one (a path,
    say)."""
    try:
        fh = io.BytesIO(first)
        read_preamble(fh, False)
        meta = compat.read_file_meta(fh)
        found = (normalise_uid(meta.get("MediaStorageSOPClassUID", "")),
                 normalise_uid(meta.get("MediaStorageSOPInstanceUID", "")))
    except Exception:  # pydicom raises one of many types on a malformed value
        return "", ""
    sop_class, sop_uid = (uid if is_valid_uid(uid) else "" for uid in found)
    return sop_class, sop_uid


async def _audit(request: web.Request, outcome: _Outcome) -> None:
    if outcome.stored:
        user, address = common.who(request)
        await asyncio.to_thread(common.services(request).auditor.web_stored, user, address,
                                [header for _, _, header in outcome.stored])


def _answer(request: web.Request, target: str, outcome: _Outcome) -> web.Response:
    base = common.base_url(request)
    body: dict[str, Any] = {}
    if target:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}{common.PREFIX}/studies/{target}"]}
    if outcome.failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {**_reference(sop_class, sop_uid),
             "00081197": {"vr": "US", "Value": [reason]}}
            for sop_class, sop_uid, reason in outcome.failed]}
    if outcome.stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {**_reference(sop_class, sop_uid),
             "00081190": {"vr": "UR", "Value": [
                 f"{base}{common.PREFIX}/studies/{h.study_uid}/series/{h.series_uid}"
                 f"/instances/{h.sop_uid}"]}}
            for sop_class, sop_uid, h in outcome.stored]}
    if outcome.failed and not outcome.stored and outcome.no_space == len(outcome.failed):
        return common.json_response(body, status=503,
                                    headers={"Retry-After": RETRY_AFTER_SECONDS})
    status = 200 if not outcome.failed else 202 if outcome.stored else 409
    return common.json_response(body, status=status)


def _reference(sop_class: str, sop_uid: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["00081150"] = {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"}
    out["00081155"] = {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}
    return out
