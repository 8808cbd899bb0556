"""Smoke: a real `pacs-edge serve` answers dcmtk's C-ECHO and stores a study from storescu."""

from __future__ import annotations

import json

import dcmtk
import dicomgen
from conftest import EdgeServer


def test_echoscu_gets_success(edge_server: EdgeServer) -> None:
    result = dcmtk.echoscu(edge_server.port, aec=edge_server.ae_title).check()
    assert result.ok


def test_unknown_calling_ae_is_rejected_and_server_keeps_serving(
    edge_server: EdgeServer,
) -> None:
    rejected = dcmtk.echoscu(edge_server.port, aet="STRANGER", aec=edge_server.ae_title)
    assert not rejected.ok
    assert "reject" in rejected.output.lower()
    assert edge_server.echo().ok


def test_storescu_stores_a_generated_study(edge_server: EdgeServer,
                                           small_study: list[dicomgen.GeneratedInstance]
                                           ) -> None:
    result = dcmtk.storescu(edge_server.port, [i.path for i in small_study],
                            aec=edge_server.ae_title).check()
    assert result.store_responses() == ["Success"] * len(small_study)

    status = json.loads(edge_server.cli("status", "--json").stdout)
    assert status["studies"] == 1
    assert status["series"] == 2
    assert status["instances"] == len(small_study)


def test_server_restarts_on_the_same_port_after_sigkill(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance]
) -> None:
    dcmtk.storescu(edge_server.port, [small_study[0].path], aec=edge_server.ae_title).check()
    port = edge_server.port
    edge_server.kill()
    assert not edge_server.running
    edge_server.start()
    assert edge_server.port == port
    status = json.loads(edge_server.cli("status", "--json").stdout)
    assert status["instances"] == 1


def test_sigterm_stops_the_server_cleanly(edge_server: EdgeServer) -> None:
    code = edge_server.stop()
    problems = list(edge_server.unclean_stops)
    edge_server.unclean_stops.clear()  # reported here, not again at teardown
    assert code == 0, problems
    assert "stopped" in edge_server.log()
