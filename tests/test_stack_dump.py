"""`kill -USR1` on serve writes every thread's stack to its log and serving goes on."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from conftest import EdgeServer


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_writes_every_threads_stack_and_serving_goes_on(
        edge_server_factory: Callable[..., EdgeServer], workers: int) -> None:
    server = edge_server_factory(start=False)
    server.configure(dicom={"workers": workers})
    server.start()
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while server.log().count("Current thread") < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    # One dump per process: with two workers, each worker's own (the supervisor's too).
    assert log.count("Current thread") >= workers
    assert "serve_forever" in log  # the DICOM listener's thread
    assert server.echo().ok
    assert server.stop() == 0
