"""A box whose clock is far off: Azure refuses it, and the operator is told it is the clock.

Azure refuses a request whose x-ms-date is more than 15 minutes from its own clock
with 403 AuthenticationFailed, the answer it gives to a wrong account key (and a
HEAD, what stat sends, carries no detail to tell the two apart). The store reads the
Date of the answer: when it is that far from this machine's clock, the error says
the clock is off, not that the credentials were refused, so the operator does not
rotate keys that were fine. Azurite does not check request dates, so the skewed
service is a proxy in front of a real Azurite that answers each request as Azure
does for a box two hours behind; the wrong-key case is Azurite's own answer.
"""

from __future__ import annotations

import email.utils
import socket
import time
import uuid

import pytest
from tcpproxy import TcpProxy

from sync.blobstore.azure import AzureBlobStore
from sync.blobstore.base import BlobStoreUnavailable

SKEW = 2 * 3600.0  # the service's clock is two hours ahead of the box's


class SkewedAzure(TcpProxy):
    """Answers every request as Azure answers one dated SKEW seconds too early."""

    def to_server(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                if chunk.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1"):  # a request line
                    source.sendall(self._refusal(head=chunk.startswith(b"HEAD ")))
        except OSError:
            pass

    @staticmethod
    def _refusal(*, head: bool) -> bytes:
        date = email.utils.formatdate(time.time() + SKEW, usegmt=True)
        body = ("<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed"
                "</Code><Message>Server failed to authenticate the request. Make sure the value"
                " of Authorization header is formed correctly including the signature.</Message>"
                "<AuthenticationErrorDetail>Request date header too old: '"
                f"{email.utils.formatdate(time.time(), usegmt=True)}'</AuthenticationErrorDetail>"
                "</Error>").encode()
        head_lines = ("HTTP/1.1 403 Server failed to authenticate the request.\r\n"
                      "x-ms-error-code: AuthenticationFailed\r\n"
                      f"Date: {date}\r\nContent-Type: application/xml\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode()
        return head_lines if head else head_lines + body


def test_a_clock_far_off_is_named_as_the_clock_not_the_credentials(azurite: str) -> None:
    port = int(azurite.split("127.0.0.1:")[1].split("/")[0])
    with SkewedAzure(port) as proxy:
        store = AzureBlobStore(f"clock-{uuid.uuid4().hex[:12]}",
                               azurite.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}"))
        try:
            for operation, call in (("stat", lambda: store.stat("packs/x")),
                                    ("list", lambda: list(store.list())),
                                    ("put", lambda: store.put("packs/x", [b"data"]))):
                with pytest.raises(BlobStoreUnavailable) as caught:
                    call()
                assert caught.value.operation == operation
                assert "clock is 120 minutes behind" in caught.value.message
                assert "credentials are not the problem" in (caught.value.hint or "")
        finally:
            store.close()


def test_a_wrong_key_with_the_clock_right_is_still_the_credentials(azurite: str) -> None:
    store = AzureBlobStore(f"clock-{uuid.uuid4().hex[:12]}",
                           azurite.replace("AccountKey=Eby8", "AccountKey=Xby8"))
    try:
        with pytest.raises(BlobStoreUnavailable) as caught:
            store.stat("packs/x")
        assert "refused our credentials" in caught.value.message
        assert "clock is" not in caught.value.message
    finally:
        store.close()
