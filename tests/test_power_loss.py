"""Power loss under load: every acknowledged instance survives, on a disk that forgets.

The acknowledgement guarantee (docs/storage.md) promises that an instance answered
Success survives a power loss on storage that honours fsync. A SIGKILL cannot test
that (the page cache survives it), so here serve's data home lives on crashfs
(tests/crashfs.py): a FUSE file system that keeps only what strict POSIX durability
promises (a file's contents at its fsync, a folder's entries at that folder's fsync)
and can lose everything else at a cut.

One box lives through CUTS power cuts. Before each, modalities (pynetdicom, one
association per thread) send at once: pairs of associations splitting new studies'
series between them instance by instance (the second stores into a series folder
the first has just created, or the other way round), and new series of studies
stored before. Each Success is timed with time.monotonic(). At a seeded random
moment the power is cut, serve is killed, the durable view becomes the home again
and serve starts on it (its crash recovery runs). Then every instance acknowledged
before any cut so far must be retrievable byte-exact by C-GET, `pacs-edge fsck`
must find no row without its file, and the index must pass PRAGMA integrity_check.

An HL7 AA and a STOW-RS 200 are the same kind of promise: orders answered AA before a
cut are in the worklist after it, instances answered 200 come back byte-exact.

PACS_EDGE_POWER_SEED replays a failure (its seed is in the message);
PACS_EDGE_POWER_CUTS runs more cuts (`make soak`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcmtk
import dicomgen
import hl7peer
import pytest
import webpeer
from cget import c_get_studies
from conftest import EDGE_AE, HOST, TEST_AE, EdgeServer, init_home
from crashfs import CrashFS, require_fuse
from pynetdicom import AE
from pynetdicom.association import Association

# pynetdicom drops the socket of a connection reset by the killed serve without closing
# it when its own thread gets there first (close_broken_off below closes the others).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SEED = int(os.environ.get("PACS_EDGE_POWER_SEED", "20261206"))
CUTS = int(os.environ.get("PACS_EDGE_POWER_CUTS", "3"))
# How long each fsync takes on crashfs: about a disk's cache flush. An fsync takes
# effect when it returns, so an answer that does not wait for one is caught meanwhile.
FSYNC_DELAY = 0.01
PAIRS = 2  # pairs of associations sharing new studies' series
STUDIES_PER_PAIR = 10
INSTANCES_PER_SERIES = 4
EXISTING_STUDIES = 2
CUT_WINDOW = (0.3, 2.2)  # seconds after the senders start
SENDER_JOIN = 30.0


@dataclass(frozen=True)
class Ack:
    sop_uid: str
    study_uid: str
    sha256: str
    at: float  # time.monotonic() when the Success arrived


class Modality(threading.Thread):
    """One association sending `instances` in order until done or refused; the Successes
    it saw, timed."""

    def __init__(self, port: int, instances: list[dicomgen.GeneratedInstance]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.instances = instances
        self.acks: list[Ack] = []
        self.error = ""
        self.assoc: Association | None = None

    def run(self) -> None:
        ae = AE(TEST_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        for context in {(i.sop_class_uid, i.transfer_syntax) for i in self.instances}:
            ae.add_requested_context(context[0], [context[1]])
        assoc = self.assoc = ae.associate(HOST, self.port, ae_title=EDGE_AE)
        if not assoc.is_established:
            self.error = "association refused"
            return
        try:
            for instance in self.instances:
                status = assoc.send_c_store(instance.path)
                now = time.monotonic()
                if "Status" not in status or int(status.Status) != 0x0000:
                    self.error = f"store answered {status.get('Status', 'nothing')}"
                    return
                self.acks.append(Ack(instance.sop_instance_uid, instance.study_uid,
                                     sha256(dicomgen.dataset_bytes(instance.path)), now))
        except Exception as exc:  # the cut: the association breaks off
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if assoc.is_established:
                assoc.abort()


class Ris(threading.Thread):
    """One MLLP connection sending a new order (ORM) per accession until done or refused;
    the AAs it saw, timed."""

    def __init__(self, port: int, accessions: list[str]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.accessions = accessions
        self.acks: dict[str, float] = {}  # accession -> time.monotonic() of its AA
        self.error = ""

    def run(self) -> None:
        try:
            with contextlib.closing(hl7peer.raw(self.port)) as sock:
                sock.settimeout(20)
                for accession in self.accessions:
                    sock.sendall(hl7peer.frame(hl7peer.orm(
                        f"C{accession}", accession=accession, patient_id=f"P{accession}")))
                    ack = hl7peer.read_ack_unless_closed(sock)
                    if ack is None or ack.code != "AA":
                        self.error = f"{accession} answered {ack.code if ack else 'nothing'}"
                        return
                    self.acks[accession] = time.monotonic()
        except OSError as exc:  # the cut: the connection breaks off
            self.error = f"{type(exc).__name__}: {exc}"


class Stow(threading.Thread):
    """One HTTPS client posting one instance per STOW-RS request until done or refused;
    the 200s it saw, timed."""

    def __init__(self, server: EdgeServer, instances: list[dicomgen.GeneratedInstance]) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.instances = instances
        self.acks: list[Ack] = []
        self.error = ""

    def run(self) -> None:
        http = webpeer.session(self.server, "rad")
        url = webpeer.base_url(self.server) + "/dicom-web/studies"
        try:
            for instance in self.instances:
                body, content_type = webpeer.multipart_body([instance.path])
                answer = http.post(url, data=body, timeout=20, headers={
                    "Content-Type": content_type, "Accept": "application/dicom+json"})
                now = time.monotonic()
                if answer.status_code != 200:
                    self.error = f"STOW-RS answered {answer.status_code}"
                    return
                self.acks.append(Ack(instance.sop_instance_uid, instance.study_uid,
                                     sha256(dicomgen.dataset_bytes(instance.path)), now))
        except OSError as exc:  # the cut: the connection breaks off, or (between two
            # requests) the CA file, on the cut file system, is gone; RequestException is one
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            http.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send_all(port: int, instances: list[dicomgen.GeneratedInstance]) -> list[Ack]:
    sender = Modality(port, instances)
    sender.run()
    assert not sender.error, sender.error
    return sender.acks


class Box:
    """The data home at `home`, moved onto crashfs for each life and back after its cut."""

    def __init__(self, root: Path, *, hl7_port: int = 0, http_port: int = 0) -> None:
        self.root = root
        self.home = init_home(root / "edge-home", http_port=http_port)
        self.server = EdgeServer(self.home)
        self.lives = 0
        if hl7_port:
            hl7peer.listen(self.server, hl7_port)
        self.server.start()  # a box that has served before: its index exists
        if http_port:
            webpeer.add_user(self.server, "rad", "radiologist")
        self.server.stop()

    def crash_life(self, senders: Sequence[threading.Thread], until: Callable[[CrashFS], None],
                   **options: Any) -> float:
        """Serve on crashfs while `until(fs)` starts `senders` (a modality's port set here) and
        returns at the moment of the cut; the durable view is the home again. Returns the
        cut's time.monotonic()."""
        self.lives += 1
        backing = self.root / f"backing-{self.lives}"
        durable = self.root / f"durable-{self.lives}"
        os.rename(self.home, backing)
        with CrashFS(backing, self.home, self.root / f"crashfs-{self.lives}",
                     fsync_delay=FSYNC_DELAY, **options) as fs:
            try:
                self.server.start()
                for sender in senders:
                    if isinstance(sender, Modality):
                        sender.port = self.server.port
                until(fs)
                cut_at = fs.cut()
            finally:
                self.server.kill()
                for sender in senders:
                    if sender.ident is not None:
                        sender.join(SENDER_JOIN)
                    if isinstance(sender, Modality) and sender.assoc is not None:
                        close_broken_off(sender.assoc)
            fs.materialize(durable)
        os.rmdir(self.home)
        os.rename(durable, self.home)
        return cut_at


def close_broken_off(assoc: Association) -> None:
    """Close the socket of an association the cut broke off, once its threads are done.
    pynetdicom 3.0.4 closes it only when its shutdown() succeeds, which it does not
    on a connection the peer reset (transport.AssociationSocket._shutdown_socket)."""
    assoc.join(SENDER_JOIN)
    assoc.dul.join(SENDER_JOIN)
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.close()


def poll(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.01)


def make_pool(root: Path) -> tuple[list[dicomgen.GeneratedInstance],
                                   list[list[dicomgen.GeneratedInstance]]]:
    """The studies stored before the first cut (series 0 of EXISTING_STUDIES studies), and
    per cut the new series of those studies (series 1 + cut, same seed: same studies)."""
    existing = dicomgen.make_studies(root / "existing", seed=SEED % 1000,
                                     patients=EXISTING_STUDIES, series_per_study=1 + CUTS,
                                     instances_per_series=INSTANCES_PER_SERIES, size=32)
    by_series = dicomgen.group_by(existing, "SeriesNumber")
    ordered = sorted(by_series.values(), key=lambda s: int(s[0].header.SeriesNumber))
    return ordered[0], ordered[1:]


def new_studies(root: Path, cut: int, pair: int) -> list[dicomgen.GeneratedInstance]:
    return dicomgen.make_studies(root / f"new-{cut}-{pair}", seed=SEED % 1000 + 1 + cut * 10 + pair,
                                 patients=STUDIES_PER_PAIR, series_per_study=1,
                                 instances_per_series=INSTANCES_PER_SERIES, size=32)


@pytest.mark.slow
def test_acknowledged_instances_survive_power_cuts(tmp_path: Path) -> None:
    require_fuse()
    rng = random.Random(SEED)
    first, later_series = make_pool(tmp_path / "pool")
    assert len({i.series_uid for i in first}) == EXISTING_STUDIES
    box = Box(tmp_path / "box")
    storage = {(i.sop_class_uid, i.transfer_syntax) for i in first}
    box.server.start()
    acked = {a.sop_uid: a for a in send_all(box.server.port, first)}
    box.server.stop()
    try:
        for cut in range(CUTS):
            pairs = [new_studies(tmp_path / "pool", cut, pair) for pair in range(PAIRS)]
            senders = [Modality(0, studies[half::2]) for studies in pairs for half in (0, 1)]
            senders.append(Modality(0, later_series[cut]))
            storage |= {(i.sop_class_uid, i.transfer_syntax) for s in senders
                        for i in s.instances}
            cut_after = rng.uniform(*CUT_WINDOW)

            def start_then_wait(fs: CrashFS, senders: list[Modality] = senders,
                                cut_after: float = cut_after) -> None:
                for sender in senders:
                    sender.start()
                time.sleep(cut_after)  # the random moment of the cut, not a wait for a state

            # Every other cut keeps a seeded half of what was never fsynced, as a real
            # disk may: crash recovery must cope with that too.
            keep = {"keep_probability": 0.5, "keep_seed": SEED + cut} if cut % 2 else {}
            cut_at = box.crash_life(senders, start_then_wait, **keep)
            before = [a for s in senders for a in s.acks if a.at < cut_at]
            acked.update((a.sop_uid, a) for a in before)
            context = (f"PACS_EDGE_POWER_SEED={SEED} cut {cut + 1}/{CUTS} {keep or 'strict'} "
                       f"{cut_after:.3f}s after the senders started, "
                       f"{len(before)} of {sum(len(s.instances) for s in senders)} "
                       "acknowledged before it")
            box.server.start()
            check_box(box, acked, storage, context)
            box.server.stop()
            assert not box.server.unclean_stops, box.server.unclean_stops
    finally:
        box.server.stop()


def check_box(box: Box, acked: dict[str, Ack], storage: set[tuple[str, str]],
              context: str) -> None:
    """Every acknowledged instance retrievable byte-exact; fsck and SQLite clean."""
    studies = sorted({a.study_uid for a in acked.values()})
    arrivals, _ = c_get_studies(box.server.port, studies, storage)
    got = {uid: sha256(data[-1]) for uid, data in arrivals.items()}
    lost = sorted(uid for uid in acked if uid not in got)
    changed = sorted(uid for uid, a in acked.items() if uid in got and got[uid] != a.sha256)
    assert not lost and not changed, (
        f"{context}: {len(lost)} acknowledged instance(s) lost, {len(changed)} changed "
        f"(of {len(acked)}):\n{box.server.log()[-3000:]}")
    fsck = box.server.cli("fsck", check=False)
    assert fsck.returncode == 0 and "consistent" in fsck.stdout, \
        f"{context}: fsck:\n{fsck.stdout}{fsck.stderr}"
    index = sqlite3.connect(f"file:{box.home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        assert index.execute("PRAGMA integrity_check").fetchall() == [("ok",)], context
    finally:
        index.close()


def test_a_store_into_a_series_folder_another_just_made_waits_until_its_path_is_durable(
        tmp_path: Path) -> None:
    """The first instance of a new study makes its study and series folders and fsyncs
    the series, study and store folders, in that order. A second association storing
    into that series meanwhile finds the folder there: it must not answer before the
    folder's path is durable too. Here the store folder's fsync takes 2 s; the power is
    cut at the first Success, and what it acknowledged must be there."""
    require_fuse()
    study = dicomgen.make_studies(tmp_path / "pool", seed=SEED % 1000 + 7, patients=1,
                                  series_per_study=1, instances_per_series=2, size=32)
    storage = {(i.sop_class_uid, i.transfer_syntax) for i in study}
    box = Box(tmp_path / "box")
    first, second = Modality(0, study[:1]), Modality(0, study[1:])

    def race(fs: CrashFS) -> None:
        first.start()
        poll(lambda: "store" in fs.syncing(), "the first store fsyncing the store folder")
        second.start()
        poll(lambda: bool(first.acks or second.acks), "a Success")

    try:
        cut_at = box.crash_life([first, second], race, slow={"store": 2.0})
        acked = {a.sop_uid: a for a in first.acks + second.acks if a.at < cut_at}
        assert acked, "no Success before the cut"
        box.server.start()
        check_box(box, acked, storage, "a second association into a new series folder")
        box.server.stop()
        assert not box.server.unclean_stops, box.server.unclean_stops
    finally:
        box.server.stop()


def cut_after_the_first_answer(senders: Sequence[Any], rng: random.Random
                               ) -> Callable[[CrashFS], None]:
    """What a life does before its cut: start the senders, wait for the first answer,
    then a random moment. On a loaded machine the first answer can take longer than any
    fixed moment, and a cut before it proves nothing."""
    def start_then_wait(fs: CrashFS) -> None:
        for sender in senders:
            sender.start()
        poll(lambda: any(sender.acks for sender in senders), "a first answer")
        time.sleep(rng.uniform(0.0, 1.2))

    return start_then_wait


def test_acknowledged_orders_survive_a_power_cut(tmp_path: Path) -> None:
    """An HL7 AA is a promise like a C-STORE Success: three RIS connections send new
    orders at once, the power is cut at a seeded random moment, and every order answered
    AA before the cut is in the worklist after the restart."""
    require_fuse()
    rng = random.Random(SEED + 1)
    port = dcmtk.free_port()
    box = Box(tmp_path / "box", hl7_port=port)
    senders = [Ris(port, [f"PWR{ris}{n:03d}" for n in range(60)]) for ris in range(3)]

    try:
        cut_at = box.crash_life(senders, cut_after_the_first_answer(senders, rng))
        acked = {a for s in senders for a, at in s.acks.items() if at < cut_at}
        assert acked, "no AA before the cut"
        box.server.start()
        listed = json.loads(box.server.cli("worklist", "list", "--json").stdout)
        lost = sorted(acked - {order["accession_number"] for order in listed})
        assert not lost, f"PACS_EDGE_POWER_SEED={SEED}: {len(lost)} of {len(acked)} orders " \
            f"answered AA are not in the worklist: {lost}"
        box.server.stop()
        assert not box.server.unclean_stops, box.server.unclean_stops
    finally:
        box.server.stop()


def test_instances_stored_by_stow_rs_before_a_power_cut_survive_it(tmp_path: Path) -> None:
    """A STOW-RS 200 is a promise like a C-STORE Success: two HTTPS clients post new
    studies' instances one per request, the power is cut at a seeded random moment, and
    every instance answered 200 before the cut comes back byte-exact by C-GET."""
    require_fuse()
    rng = random.Random(SEED + 2)
    studies = [dicomgen.make_studies(tmp_path / f"pool-{n}", seed=SEED % 1000 + 50 + n,
                                     patients=8, series_per_study=1,
                                     instances_per_series=3, size=32) for n in range(2)]
    storage = {(i.sop_class_uid, i.transfer_syntax) for study in studies for i in study}
    box = Box(tmp_path / "box", http_port=dcmtk.free_port())
    senders = [Stow(box.server, study) for study in studies]

    try:
        cut_at = box.crash_life(senders, cut_after_the_first_answer(senders, rng))
        acked = {a.sop_uid: a for s in senders for a in s.acks if a.at < cut_at}
        assert acked, "no 200 before the cut"
        box.server.start()
        check_box(box, acked, storage, f"PACS_EDGE_POWER_SEED={SEED} STOW-RS")
        box.server.stop()
        assert not box.server.unclean_stops, box.server.unclean_stops
    finally:
        box.server.stop()


def test_an_import_into_a_series_folder_serve_just_made_waits_until_its_path_is_durable(
        tmp_path: Path) -> None:
    """The same race across processes (a second DIMSE worker, or `import`, as here):
    the folders serve is still making durable carry a mark on disk that the other
    process sees. The store folder's fsync takes 6 s, to outlast the command's start;
    the cut comes when either is done."""
    require_fuse()
    study = dicomgen.make_studies(tmp_path / "pool", seed=SEED % 1000 + 8, patients=1,
                                  series_per_study=1, instances_per_series=2, size=32)
    storage = {(i.sop_class_uid, i.transfer_syntax) for i in study}
    box = Box(tmp_path / "box")
    first = Modality(0, study[:1])
    imported: list[float] = []

    def run_import() -> None:
        done = box.server.cli("import", str(study[1].path), check=False)
        if done.returncode == 0 and "stored 1 " in done.stdout:
            imported.append(time.monotonic())

    second = threading.Thread(target=run_import, daemon=True)

    def race(fs: CrashFS) -> None:
        first.start()
        poll(lambda: "store" in fs.syncing(), "the first store fsyncing the store folder")
        second.start()
        poll(lambda: bool(first.acks or imported), "a Success or an import")

    try:
        cut_at = box.crash_life([first, second], race, slow={"store": 6.0})
        acked = {a.sop_uid: a for a in first.acks if a.at < cut_at}
        if imported and imported[0] < cut_at:
            acked[study[1].sop_instance_uid] = Ack(
                study[1].sop_instance_uid, study[1].study_uid,
                sha256(dicomgen.dataset_bytes(study[1].path)), imported[0])
        assert acked, "nothing acknowledged before the cut"
        box.server.start()
        check_box(box, acked, storage, "an import into a new series folder of serve's")
        box.server.stop()
        assert not box.server.unclean_stops, box.server.unclean_stops
    finally:
        box.server.stop()
