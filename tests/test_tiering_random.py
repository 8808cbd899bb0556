"""Randomized tiering: a seeded run of operations against a model of what must be retrievable.

The model is the simplest possible one: every instance the box acknowledged
(C-STORE status Success), with the bytes that were sent. Tiering may move
them between local disk and the cloud in any order; none may ever be lost or
changed. The operations, drawn from a seeded generator (so a failure replays
with the same PACS_EDGE_RANDOM_SEED):

- store a new instance into a random study over C-STORE (a new study now
  and then, a duplicate once a study's pool is used up);
- a sync pass (replicate), an eviction, a recall, a scrub of a random share
  of the packs (which must find nothing damaged), run in this process
  through the sync package, as the CLI runs them;
- the same three as real `pacs-edge` processes SIGKILLed at a random crash
  point (sync/crashpoints.py);
- SIGKILL the running sync agent and start a new one.

After every step `fsck` must be clean and one random study must come back
byte-identical by C-GET from the real `pacs-edge serve` (the agent recalls it
if it is evicted); every 10 steps and at the end, every study. Checking all
of them after every step would recall every evicted study at once, and the
states that matter most (evicted with late instances, a recall killed
half-way) would never last long enough to meet the next operation.

The suite runs STEPS operations; `make soak` runs many more
(PACS_EDGE_RANDOM_STEPS) with other seeds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dicomgen
import pytest
from cget import c_get_studies
from conftest import EDGE_AE, HOST, TEST_AE, EdgeServer, pacs_edge_command
from pynetdicom import AE
from syncagent import SyncAgent

from appliance.base.config import load_config
from appliance.base.errors import PacsEdgeError
from appliance.services.fsck import fsck
from appliance.store.study_rows import study_by_uid
from sync.agent import sync_pass
from sync.context import SyncContext, open_context
from sync.evict import evict_study
from sync.recall import recall_study
from sync.scrub import scrub_packs, select_packs

STEPS = int(os.environ.get("PACS_EDGE_RANDOM_STEPS", "120"))
SEED = int(os.environ.get("PACS_EDGE_RANDOM_SEED", "20261203"))
FULL_CHECK_EVERY = 10
CRASH_POINTS = {
    "sync": ["replicate:before-upload", "upload:mid-pack", "upload:after-pack",
             "upload:after-manifest", "replicate:before-commit", "replicate:after-commit",
             "evict:mid-delete"],
    "evict": ["evict:after-commit", "evict:mid-delete"],
    "recall": ["recall:mid-instances", "recall:before-commit"],
    "scrub": ["scrub:mid-pack", "scrub:before-commit", "scrub:after-commit"],
}
OPERATIONS = [("store", 38), ("sync", 14), ("evict", 14), ("recall", 8), ("scrub", 5),
              ("crash", 12), ("restart-agent", 4)]

pytestmark = [pytest.mark.slow]


@dataclass
class Model:
    """What the box acknowledged: SOP Instance UID -> dataset bytes, per study."""

    acknowledged: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def studies(self) -> list[str]:
        return sorted(self.acknowledged)


@dataclass
class Pool:
    """Instances not sent yet, per study, in the order a modality would send them."""

    unsent: dict[str, list[dicomgen.GeneratedInstance]]
    sent: dict[str, list[dicomgen.GeneratedInstance]] = field(default_factory=dict)

    def next_for(self, rng: random.Random, study_uids: list[str]) -> dicomgen.GeneratedInstance:
        new_studies = [uid for uid in sorted(self.unsent) if uid not in self.sent]
        if new_studies and (not study_uids or rng.random() < 0.15):
            uid = new_studies[0]
        else:
            uid = rng.choice(study_uids)
        # Once a study's pool is used up, a modality re-sends one: a duplicate.
        instance = (self.unsent[uid].pop(0) if self.unsent.get(uid)
                    else rng.choice(self.sent[uid]))
        self.sent.setdefault(uid, []).append(instance)
        return instance


def c_store(edge: EdgeServer, instance: dicomgen.GeneratedInstance) -> int:
    ae = AE(TEST_AE)
    ae.add_requested_context(instance.sop_class_uid, [instance.transfer_syntax])
    assoc = ae.associate(HOST, edge.port, ae_title=EDGE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(instance.path)
    finally:
        assoc.release()
    return int(status.Status)


def c_get_study(edge: EdgeServer, study_uid: str, storage: set[tuple[str, str]]
                ) -> dict[str, list[bytes]]:
    arrived, [final] = c_get_studies(edge.port, [study_uid], storage)
    assert final == 0x0000, final
    return arrived


class Run:
    """One randomized run: the real server and agent, the model, the generator."""

    def __init__(self, edge: EdgeServer, ctx: SyncContext, pool: Pool,
                 storage: set[tuple[str, str]], rng: random.Random) -> None:
        self.edge = edge
        self.ctx = ctx
        self.pool = pool
        self.storage = storage
        self.rng = rng
        self.model = Model()
        self.agent = SyncAgent(edge.home).start()
        self.log: list[str] = []

    async def step(self, number: int) -> None:
        names, weights = zip(*OPERATIONS, strict=True)
        operation = self.rng.choices(names, weights)[0]
        if operation == "store" or not self.model.studies():
            await self.store()
        elif operation == "restart-agent":
            self.restart_agent()
        else:
            await getattr(self, operation)(await self.target(operation))
        await self.check(full=number % FULL_CHECK_EVERY == 0)

    async def target(self, operation: str) -> str:
        """A random study; mostly one in the state the operation applies to, so that
        evictions and recalls happen often enough, not only their refusals."""
        fitting = {"evict": "replicated", "recall": "evicted"}.get(operation)
        studies = self.model.studies()
        if fitting and self.rng.random() < 0.8:
            states = {uid: (await study_by_uid(self.ctx.index, uid)) for uid in studies}
            matching = [uid for uid, row in states.items() if row and row.tier_state == fitting]
            studies = matching or studies
        return self.rng.choice(studies)

    async def store(self) -> None:
        instance = self.pool.next_for(self.rng, self.model.studies())
        status = await asyncio.to_thread(c_store, self.edge, instance)
        self.log.append(f"store {instance.path.name} -> {status:#06x}")
        if status == 0x0000:
            self.model.acknowledged.setdefault(instance.study_uid, {})[
                instance.sop_instance_uid] = dicomgen.dataset_bytes(instance.path)

    async def sync(self, _uid: str) -> None:
        report = await sync_pass(self.ctx, stable_after=0, evict=False)
        self.log.append(f"sync -> {len(report.replicated)} replicated, busy {report.busy}")
        assert report.ok, report.failures

    async def scrub(self, _uid: str) -> None:
        packs = await select_packs(self.ctx, fraction=self.rng.choice([0.3, 1.0]))
        report = await scrub_packs(self.ctx, packs)
        self.log.append(f"scrub {len(packs)} pack(s) -> {report.ok} ok")
        assert not report.damaged, report.damaged

    async def evict(self, uid: str) -> None:
        await self._tiering("evict", uid, evict_study)

    async def recall(self, uid: str) -> None:
        await self._tiering("recall", uid, recall_study)

    async def _tiering(self, name: str, uid: str, operation: object) -> None:
        study = await study_by_uid(self.ctx.index, uid)
        assert study is not None
        try:
            await operation(self.ctx, study)  # type: ignore[operator]
            self.log.append(f"{name} {uid[-6:]} ({study.tier_state}) -> done")
        except PacsEdgeError as exc:  # not evictable / not evicted / busy: refused, fine
            self.log.append(f"{name} {uid[-6:]} ({study.tier_state}) -> {exc.message}")

    async def crash(self, uid: str) -> None:
        command = self.rng.choice(sorted(CRASH_POINTS))
        point = self.rng.choice(CRASH_POINTS[command])
        args = {"sync": ["sync", "--once", "--stable-after", "0"], "evict": ["evict", uid],
                "recall": ["recall", uid], "scrub": ["scrub", "--all"]}[command]
        proc = await asyncio.to_thread(
            subprocess.run, [*pacs_edge_command(), *args, "--home", str(self.edge.home)],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PACS_EDGE_CRASH_AT": point})
        outcome = "killed" if proc.returncode == -signal.SIGKILL else f"exit {proc.returncode}"
        self.log.append(f"crash {command} at {point} -> {outcome}")
        assert proc.returncode in (-signal.SIGKILL, 0, 1, 2), proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr

    def restart_agent(self) -> None:
        assert self.agent.proc is not None
        os.killpg(self.agent.proc.pid, signal.SIGKILL)
        self.agent.proc.wait(60)
        self.agent = SyncAgent(self.edge.home).start()
        self.log.append("agent killed and restarted")

    async def check(self, *, full: bool) -> None:
        report = await fsck(self.ctx.files, self.ctx.index, repair=False)
        assert report.clean, (report, self.log[-10:])
        studies = self.model.studies()
        for uid in studies if full else [self.rng.choice(studies)]:
            arrived = await asyncio.to_thread(c_get_study, self.edge, uid, self.storage)
            want = self.model.acknowledged[uid]
            assert {sop: len(got) for sop, got in arrived.items()} == dict.fromkeys(want, 1), (
                uid, self.log[-10:])
            assert {sop: got[0] for sop, got in arrived.items()} == want, (uid, self.log[-10:])


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    instances = dicomgen.make_studies(tmp_path / "pool", seed=SEED % 1000, patients=3,
                                      studies_per_patient=2, series_per_study=2,
                                      instances_per_series=5, size=16)
    rng = random.Random(SEED)
    rng.shuffle(instances)  # instances of a study arrive in no particular order
    unsent: dict[str, list[dicomgen.GeneratedInstance]] = {}
    for instance in instances:
        unsent.setdefault(instance.study_uid, []).append(instance)
    yield Pool(unsent)


async def test_every_acknowledged_instance_survives_random_tiering(
    edge_server: EdgeServer, pool: Pool,
) -> None:
    edge_server.stop()
    edge_server.configure(
        sync={"stable_after_seconds": 3600.0, "replicate_interval_seconds": 3600.0,
              "recall_poll_seconds": 0.2, "evict_after_days": 0.0,
              "disk_high_watermark_percent": 100.0, "disk_low_watermark_percent": 99.0,
              "recall_timeout_seconds": 120.0, "segment_size": 4096})
    edge_server.start()
    storage = {(i.sop_class_uid, i.transfer_syntax)
               for instances in pool.unsent.values() for i in instances}
    rng = random.Random(SEED)
    async with open_context(load_config(edge_server.home)) as ctx:
        run = Run(edge_server, ctx, pool, storage, rng)
        try:
            for number in range(1, STEPS + 1):
                await run.step(number)
            await run.check(full=True)
        finally:
            run.agent.stop()
    # The run went where it should: each kind of operation did something at least once.
    done = "\n".join(run.log)
    for what in ("evict", "recall"):
        assert ") -> done" in "\n".join(line for line in run.log if line.startswith(what)), done
    assert "-> killed" in done and "agent killed" in done and "-> 1 replicated" in done, done
