"""Media types of DICOMweb: reading Accept headers, writing multipart/related responses.

Accept (PS3.18 8.7): a list of media ranges, each with parameters (`type`,
`transfer-syntax`, `q`). `MediaRange.parse_all` splits it honouring quotes,
best first (by q, then in the order given). The routes pick what they can
answer; none fits -> 406.

multipart/related (RFC 2387, PS3.18 8.6.1.2): `MultipartStream` writes one
part at a time to an aiohttp StreamResponse, file bytes in chunks read in a
worker thread, so a study of any size goes out with bounded memory. The
boundary is random; PS3.18 clients split on it.

Media types of frames by transfer syntax (PS3.18 Table 8.7.3-2): the
encapsulated syntaxes' image types; uncompressed frames are
application/octet-stream (Explicit VR Little Endian).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from appliance.base.metrics import SENT_BYTES

CHUNK = 1 << 20
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"
ANY_SYNTAX = "*"

FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}

_ITEM = re.compile(r'(?:[^,"]|"[^"]*")+')
_PARAM = re.compile(r'(?:[^;"]|"[^"]*")+')


@dataclass(frozen=True)
class MediaRange:
    media_type: str  # lower case, e.g. "multipart/related", "*/*"
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @classmethod
    def parse_all(cls, header: str | None) -> list[MediaRange]:
        """The ranges of an Accept header, best first; no header is `*/*`."""
        if not header or not header.strip():
            return [cls("*/*")]
        ranges = [cls(name, params, q) for name, params, q in _weighted_items(header) if q > 0]
        return sorted(ranges, key=lambda r: -r.q)

    @property
    def part_type(self) -> str:
        """The `type` of a multipart/related range (lower case), else ""."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str:
        return self.params.get("transfer-syntax", "")

    def matches(self, media_type: str) -> bool:
        """Whether this range admits `media_type` ("*/*", "image/*" or exactly)."""
        if self.media_type == "*/*":
            return True
        major, _, minor = self.media_type.partition("/")
        return self.media_type == media_type or (minor == "*" and
                                                 media_type.startswith(major + "/"))


def _weighted_items(header: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """The items of an Accept or Accept-Encoding header: name (lower case), parameters
    and weight (q; 0 for one that does not parse)."""
    for item in _ITEM.findall(header):
        pieces = [p.strip() for p in _PARAM.findall(item) if p.strip()]
        if not pieces:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            key, _, value = piece.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        yield pieces[0].lower(), params, q


def accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding header admits gzip (RFC 9110 12.5.3): named, or `*`,
    with a weight above 0; `gzip;q=0` refuses it whatever `*` says."""
    weights = {name: q for name, _, q in _weighted_items(header or "")}
    return weights.get("gzip", weights.get("*", 0.0)) > 0


def accepts_json(header: str | None) -> bool:
    """QIDO and metadata answer application/dicom+json (application/json is accepted)."""
    return any(r.matches(DICOM_JSON) or r.media_type == "application/json"
               for r in MediaRange.parse_all(header))


async def file_chunks(path: Path | BinaryIO, offset: int = 0, length: int | None = None
                      ) -> AsyncIterator[bytes]:
    """A file's bytes (at `path`, or an open file, closed at the end) in CHUNK pieces,
    each read in a worker thread."""
    fh = await asyncio.to_thread(path.open, "rb") if isinstance(path, Path) else path
    try:
        if offset:
            await asyncio.to_thread(fh.seek, offset)
        left = length
        while left is None or left > 0:
            size = CHUNK if left is None else min(CHUNK, left)
            chunk = await asyncio.to_thread(fh.read, size)
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(fh.close)


class MultipartStream:
    """A multipart/related response written part by part (WADO-RS: instances, frames,
    bulk data); the parts' bytes count in pacs_edge_sent_bytes{edge="dicomweb"}."""

    def __init__(self, request: web.Request, part_type: str, *, status: int = 200,
                 extra: str = "") -> None:
        self.request = request
        self.boundary = secrets.token_hex(16)
        self.response = web.StreamResponse(status=status)
        self.response.content_type = MULTIPART
        self.response.headers["Content-Type"] = (
            f'{MULTIPART}; type="{part_type}"; boundary={self.boundary}{extra}')
        self.response.headers["Cache-Control"] = "no-store"
        self._started = False

    async def part(self, content_type: str, body: bytes | AsyncIterator[bytes], *,
                   location: str = "") -> None:
        if not self._started:
            await self.response.prepare(self.request)
            self._started = True
        head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        await self.response.write((head + "\r\n").encode("latin-1"))
        if isinstance(body, bytes):
            await self.response.write(body)
            SENT_BYTES.labels("dicomweb").inc(len(body))
        else:
            async for chunk in body:
                await self.response.write(chunk)
                SENT_BYTES.labels("dicomweb").inc(len(chunk))
        await self.response.write(b"\r\n")

    async def finish(self) -> web.StreamResponse:
        if not self._started:
            await self.response.prepare(self.request)
        await self.response.write(f"--{self.boundary}--\r\n".encode("latin-1"))
        await self.response.write_eof()
        return self.response
