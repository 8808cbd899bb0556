"""The pacs-edge commands as an operator uses them: init, peers, status, import, fsck."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import CLI_TIMEOUT, NO_CAPABILITIES, EdgeServer, pacs_edge_command, run_pacs_edge
from scratchedmedia import ScratchedMedia
from syncagent import evict, sync_once
from test_clock_steps import new_york_box_at
from test_dropfolder import make_cd

from appliance.cli.common import expected_errors


def test_init_twice_changes_nothing_and_says_so(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = run_pacs_edge("init", "--home", str(home), "--ae-title", "CT_EDGE")
    assert "initialised" in first.stdout
    config = (home / "pacs-edge.toml").read_text()
    assert 'ae_title = "CT_EDGE"' in config
    assert stat.S_IMODE((home / "secrets" / "log.key").stat().st_mode) == 0o600
    second = run_pacs_edge("init", "--home", str(home), "--ae-title", "OTHER")
    assert "nothing changed" in second.stdout
    assert (home / "pacs-edge.toml").read_text() == config


def test_peer_and_user_commands_do_not_load_the_dicom_stack(edge_home: Path) -> None:
    """An operator's quick commands (and every test's set-up) start in about half the CPU
    time when pydicom (and numpy under it) stays unloaded: it was ~0.4 s of each ~0.8 s
    `pacs-edge peers list`, pulled in through compat by the metrics directory."""
    for command in (["peers", "list"], ["users", "list"]):
        loaded = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "appliance.cli", *command,
             "--home", str(edge_home)],
            capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL,
            check=True)
        modules = {line.rsplit("|", 1)[-1].strip() for line in loaded.stderr.splitlines()
                   if line.startswith("import time:")}
        assert not modules & {"pydicom", "pynetdicom", "numpy", "azure"}, command


def test_home_comes_from_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "env-home"
    env = {**os.environ, "PACS_EDGE_HOME": str(home)}
    import subprocess

    from conftest import pacs_edge_command

    subprocess.run([*pacs_edge_command(), "init"], env=env, check=True, capture_output=True)
    assert (home / "pacs-edge.toml").is_file()


def test_commands_on_a_missing_home_explain_what_to_do(tmp_path: Path) -> None:
    result = run_pacs_edge("status", "--home", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2
    assert "pacs-edge init" in result.stderr
    assert "Traceback" not in result.stderr


def test_root_is_refused_in_the_service_users_home_but_may_check_a_file(
        edge_home: Path) -> None:
    """`sudo pacs-edge status` on a box before serve's first start made the index as
    root's, and serve then stopped at once ("attempt to write a readonly database").
    A full `config check` as root made a local-folder cloud's folder root's (the agent
    then could not upload) and passed files only root could read."""
    assert os.geteuid() == 0, "the suite runs as root (it installs Debian packages)"
    for path in [edge_home, *edge_home.rglob("*")]:
        os.chown(path, 65534, 65534, follow_symlinks=False)  # nobody, the "service user"
    for command in (["status"], ["init"], ["peers", "list"], ["serve"], ["config", "check"]):
        refused = run_pacs_edge(*command, "--home", str(edge_home), check=False)
        assert refused.returncode == 2, refused
        assert (f"data home {edge_home} belongs to nobody, and this runs as root"
                in refused.stderr), refused.stderr
        assert ("hint: run it as nobody: runuser -u nobody -- " in refused.stderr
                and f"{' '.join(command)} --home {edge_home}" in refused.stderr), refused.stderr
    assert not (edge_home / "index.sqlite3").exists()
    assert not (edge_home / "cloud").exists()
    assert {p.stat().st_uid for p in [edge_home, *edge_home.rglob("*")]} == {65534}
    # A file alone (the Ansible role's validate: step, as root) reads only that file.
    for option, name in (("--config-file", "pacs-edge.toml"), ("--peers-file", "peers.toml")):
        run_pacs_edge("config", "check", "--home", str(edge_home), option,
                      str(edge_home / name))


def test_status_screen_shows_the_last_scrub_and_studies_at_risk(edge_home: Path) -> None:
    screen = run_pacs_edge("status", "--home", str(edge_home)).stdout
    assert "last scrub" in screen and "never" in screen
    assert "studies at risk" in screen


def test_status_times_name_their_zone_so_the_hour_repeated_in_the_fall_is_told_apart(
        edge_home: Path) -> None:
    """A pass at 01:30 EDT and one an hour later at 01:30 EST (1 Nov 2026, New York)."""
    shown = []
    for hour in (5, 6):
        sync_once(edge_home, env=new_york_box_at(datetime(2026, 11, 1, hour, 30, tzinfo=UTC)))
        status = subprocess.run([*pacs_edge_command(), "status", "--home", str(edge_home)],
                                capture_output=True, text=True, timeout=CLI_TIMEOUT,
                                env={**os.environ, "TZ": "America/New_York"})
        [line] = [line for line in status.stdout.splitlines() if "last sync pass" in line]
        shown.append(line)
    assert re.search(r"2026-11-01 01:30:\d\d EDT", shown[0]), shown
    assert re.search(r"2026-11-01 01:30:\d\d EST", shown[1]), shown


def test_bad_config_value_names_the_key(edge_home: Path) -> None:
    config = edge_home / "pacs-edge.toml"
    config.write_text(config.read_text().replace("max_associations = 32",
                                                 "max_associations = -3"))
    result = run_pacs_edge("config", "check", "--home", str(edge_home), check=False)
    assert result.returncode == 2
    assert "dicom.max_associations" in result.stderr and "-3" in result.stderr


def test_peer_changes_apply_to_a_running_server(edge_server: EdgeServer) -> None:
    assert not edge_server.echo(aet="NEWWS").ok
    edge_server.add_peer("new-ws", "NEWWS", 11113, allow="find")
    listed = json.loads(edge_server.cli("peers", "list", "--json").stdout)
    assert {p["name"] for p in listed} == {"testscu", "new-ws"}
    assert edge_server.echo(aet="NEWWS").ok
    edge_server.cli("peers", "remove", "new-ws")
    assert not edge_server.echo(aet="NEWWS").ok
    edge_server.wait_for_log("calling AE title is not in the allowlist")


def test_tls_only_peer_is_listed_and_flagged_on_a_box_without_tls(edge_home: Path) -> None:
    added = run_pacs_edge("peers", "add", "ws2", "--ae-title", "WS2", "--host", "127.0.0.1",
                          "--port", "104", "--allow", "find", "--tls-only", "--home",
                          str(edge_home))
    assert "ws2 is TLS-only, so it cannot associate until TLS is on" in added.stderr
    listed = json.loads(run_pacs_edge("peers", "list", "--json", "--home",
                                      str(edge_home)).stdout)
    assert [(p["name"], p["tls_only"]) for p in listed] == [("testscu", False), ("ws2", True)]
    assert "tls_only" in run_pacs_edge("peers", "list", "--home", str(edge_home)).stdout


def test_peer_without_store_permission_is_refused(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance]
) -> None:
    edge_server.add_peer("viewer", "VIEWER", 11114, allow="find")
    result = dcmtk.storescu(edge_server.port, [small_study[0].path], aet="VIEWER",
                            args=("-d",))
    # Refused at negotiation: no storage context, so not a byte of the dataset is sent.
    assert not result.ok
    assert result.store_responses() == []
    assert json.loads(edge_server.cli("status", "--json").stdout)["instances"] == 0
    assert "storage contexts refused: peer lacks permission 'store' count=1" in (
        edge_server.log())


def test_import_stores_folders_and_reports_each_rejected_file(
    edge_home: Path, tmp_path: Path
) -> None:
    study = dicomgen.make_study(tmp_path / "in" / "study", seed=31)
    dicomgen.make_non_dicom_file(tmp_path / "in", "readme.txt")
    dicomgen.make_truncated_instance(tmp_path / "in")
    result = run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "in"),
                           check=False)
    assert result.returncode == 1
    assert f"stored {len(study)}" in result.stdout
    assert "rejected 2" in result.stdout
    assert "readme.txt: not a DICOM Part 10 file" in result.stderr
    assert "truncated.dcm: dataset is truncated" in result.stderr
    again = run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "in" / "study"))
    assert f"already present {len(study)}" in again.stdout
    status = json.loads(run_pacs_edge("status", "--json", "--home", str(edge_home)).stdout)
    assert status["instances"] == len(study)
    assert status["tier_states"] == {"local": 1}


def test_import_rejects_a_file_whose_transfer_syntax_the_box_does_not_take(
    edge_home: Path, tmp_path: Path
) -> None:
    """A File Meta naming a valid UID that is no transfer syntax, or a real transfer
    syntax the box's contexts do not list, was stored as sent: no DICOM peer could
    be sent it back. Now it is rejected, and the operator reads why."""
    good, first, second = dicomgen.make_study(tmp_path / "study", seed=32,
                                              series_per_study=1, instances_per_series=3)
    (tmp_path / "in").mkdir()
    shutil.copy(good.path, tmp_path / "in" / "good.dcm")
    dicomgen.relabelled_copy(first.path, tmp_path / "in" / "bogus.dcm", "1.2.3.4")
    dicomgen.relabelled_copy(second.path, tmp_path / "in" / "unlisted.dcm",
                             "1.2.840.10008.1.2.1.98")
    result = run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "in"),
                           check=False)
    assert result.returncode == 1
    assert "stored 1" in result.stdout and "rejected 2" in result.stdout
    assert ("bogus.dcm: File Meta Transfer Syntax UID is a UID that is no transfer syntax:"
            " not one the box takes") in result.stderr
    assert ("unlisted.dcm: File Meta Transfer Syntax UID is transfer syntax 'Encapsulated"
            " Uncompressed Explicit VR Little Endian': not one the box takes") in result.stderr
    status = json.loads(run_pacs_edge("status", "--json", "--home", str(edge_home)).stdout)
    assert status["instances"] == 1


def test_import_names_a_folder_it_cannot_list_and_fails(
    edge_home: Path, tmp_path: Path
) -> None:
    """A subfolder the service user may not read (a CD copied by root) was skipped in
    silence: exit 0, 'rejected 0', and the operator deleted the source. Run as root
    without capabilities, modes apply as to the service user."""
    readable = dicomgen.make_study(tmp_path / "in" / "a", seed=32, instances_per_series=1)
    dicomgen.make_study(tmp_path / "in" / "b", seed=33, instances_per_series=1)
    private = tmp_path / "in" / "b"
    os.chown(private, 65534, 65534)
    private.chmod(0o700)
    result = subprocess.run([*NO_CAPABILITIES, *pacs_edge_command(), "import", "--home",
                             str(edge_home), str(tmp_path / "in")], capture_output=True,
                            text=True, timeout=CLI_TIMEOUT)
    assert result.returncode == 1, result
    assert f"stored {len(readable)}" in result.stdout and "rejected 1" in result.stdout
    assert (f"rejected {private}: folder cannot be listed (permission denied): its files"
            " were not imported") in result.stderr, result.stderr


def test_ctrl_c_during_import_says_what_was_kept_and_exits_130(
        edge_home: Path, tmp_path: Path) -> None:
    """A Ctrl-C printed click's `Aborted!` and exited 1: not a word on what the import
    had stored, and the exit code import gives when it rejected a file. The signal goes
    to the command's process group as a terminal sends it, once the first file is in.
    The command starts with SIGINT at its default, as from a terminal: a test run
    started in the background of a shell without job control (`make test &`) ignores
    SIGINT, and the ignoring is inherited across exec (the import ran to its end)."""
    study = dicomgen.make_study(tmp_path / "cd", seed=47, series_per_study=4,
                                instances_per_series=100)
    interruptible = [sys.executable, "-c", "import os, signal, sys;"
                     " signal.signal(signal.SIGINT, signal.SIG_DFL);"
                     " os.execvp(sys.argv[1], sys.argv[1:])"]
    command = subprocess.Popen([*interruptible, *pacs_edge_command(), "import", "--home",
                                str(edge_home), str(tmp_path / "cd")],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + CLI_TIMEOUT
    while not any((edge_home / "store").rglob("*.dcm")):
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        time.sleep(0.01)
    os.killpg(command.pid, signal.SIGINT)
    stdout, stderr = command.communicate(timeout=CLI_TIMEOUT)
    assert command.returncode == 130, (stdout, stderr)
    assert "error: interrupted (Ctrl-C): pacs-edge import stopped before it finished" in stderr
    assert ("hint: the files stored before it are kept, each whole and indexed; run the same"
            " import again: those are skipped as already present") in stderr, stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr, stderr
    kept = json.loads(run_pacs_edge("status", "--json", "--home", str(edge_home)).stdout)
    assert kept["instances"] < len(study)  # 0 when the signal beat the first index commit
    again = run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "cd")).stdout
    assert (f"stored {len(study) - kept['instances']} " in again
            and f"already present {kept['instances']}," in again), again
    # Checked after the second import: the file the signal caught between its rename and
    # its index commit (no row yet, never acknowledged) is the second import's to index.
    assert "consistent" in run_pacs_edge("fsck", "--home", str(edge_home)).stdout


def test_status_counts_on_disk_only_the_files_that_are_on_disk(
        edge_home: Path, tmp_path: Path) -> None:
    """An evicted study's instances stay in the index, their files are gone."""
    study = dicomgen.make_study(tmp_path / "study", seed=43)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "study"))
    stored = sum(p.stat().st_size for p in (edge_home / "store").rglob("*.dcm"))
    status = json.loads(run_pacs_edge("status", "--json", "--home", str(edge_home)).stdout)
    assert status["bytes_on_disk"] == stored
    sync_once(edge_home)
    evict(edge_home, study[0].study_uid)
    status = json.loads(run_pacs_edge("status", "--json", "--home", str(edge_home)).stdout)
    assert (status["instances"], status["bytes_on_disk"]) == (len(study), 0)


def test_evicting_an_evicted_study_says_there_is_nothing_to_do(
        edge_home: Path, tmp_path: Path) -> None:
    """The hint was "replicate it first (pacs-edge sync --once)", for a study whose
    packs were replicated and verified long ago: an operator cannot act on it."""
    study = dicomgen.make_study(tmp_path / "study", seed=44)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "study"))
    sync_once(edge_home)
    evict(edge_home, study[0].study_uid)
    again = run_pacs_edge("evict", study[0].study_uid, "--home", str(edge_home), check=False)
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        "error: study is evicted, not replicated",
        "hint: nothing to do: its local files are already gone (pacs-edge recall brings"
        " them back)"], again.stderr


def test_fsck_flags_missing_files_and_adopts_orphans(edge_home: Path, tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "study", seed=41)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "study"))
    assert "consistent" in run_pacs_edge("fsck", "--home", str(edge_home)).stdout

    files = sorted((edge_home / "store").rglob("*.dcm"))
    orphan_home = tmp_path / "other"
    shutil.copytree(edge_home, orphan_home)
    # An orphan: a file whose index row was never committed.
    files[0].unlink()
    moved = orphan_home / "store" / files[0].relative_to(edge_home / "store")
    report = run_pacs_edge("fsck", "--home", str(edge_home), check=False)
    assert report.returncode == 1
    assert "index row without file" in report.stdout
    assert "--repair" not in report.stdout  # it adopts files; it brings none back

    (orphan_home / "index.sqlite3").unlink()
    for suffix in ("-wal", "-shm"):
        (orphan_home / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    unrepaired = run_pacs_edge("fsck", "--home", str(orphan_home), check=False)
    assert unrepaired.returncode == 1 and "file without index row" in unrepaired.stdout
    assert "run with --repair to adopt files without rows" in unrepaired.stdout
    repaired = run_pacs_edge("fsck", "--repair", "--home", str(orphan_home))
    assert repaired.stdout.count("adopted") == len(study)
    assert moved.exists()
    status = json.loads(run_pacs_edge("status", "--json", "--home", str(orphan_home)).stdout)
    assert status["instances"] == len(study)
    assert "consistent" in run_pacs_edge("fsck", "--home", str(orphan_home)).stdout


def test_fsck_repair_audits_the_files_it_adopts_as_an_import_per_study(
        edge_home: Path, tmp_path: Path) -> None:
    """Adopted files become instances that queries find and retrieves send: one Import
    record per study (source fsck), as for `pacs-edge import`."""
    study = dicomgen.make_study(tmp_path / "study", seed=43)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "study"))
    for suffix in ("", "-wal", "-shm"):  # the index lost: every stored file an orphan
        (edge_home / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    repaired = run_pacs_edge("fsck", "--repair", "--home", str(edge_home))
    assert repaired.stdout.count("adopted") == len(study)
    log = edge_home / "audit" / "audit.log"
    adopted = [r for r in (json.loads(line)["record"] for line in log.read_text().splitlines())
               if r["EventIdentification"]["EventID"]["csd-code"] == "110107"
               and any(p.get("UserName") == "fsck" for p in r["ActiveParticipant"])]
    assert len(adopted) == 1
    ids = {o["ParticipantObjectID"] for o in adopted[0]["ParticipantObjectIdentification"]}
    assert {study[0].study_uid, str(study[0].header.PatientID)} <= ids


def test_fsck_content_finds_a_stored_file_whose_bytes_changed_and_a_resend_mends_it(
        edge_server: EdgeServer, tmp_path: Path) -> None:
    """Plain fsck compares names: a stored file with one bit rotted was 'consistent',
    and a workstation was sent the damaged bytes. --content reads every local file
    against the index's SHA-256 (prior versions kept on disk too)."""
    study = dicomgen.make_study(tmp_path / "study", seed=42)
    dcmtk.storescu(edge_server.port, [i.path for i in study]).check()
    again = dicomgen.altered_copy(study[1], tmp_path / "v2.dcm", StudyDescription="v2")
    dcmtk.storescu(edge_server.port, [again]).check()  # study[1]'s first content: a version
    assert "consistent" in edge_server.cli("fsck", "--content").stdout
    store = edge_server.home / "store"
    rotted = [next(store.rglob(f"{i.sop_instance_uid}.*.dcm")) for i in study[:1]]
    rotted += [p for p in store.rglob(f"{study[1].sop_instance_uid}.*.dcm")
               if dicomgen.dataset_bytes(p) == dicomgen.dataset_bytes(study[1].path)]
    for path in rotted:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    assert "consistent" in edge_server.cli("fsck").stdout  # names only: as before
    found = edge_server.cli("fsck", "--content", check=False)
    assert found.returncode == 1
    listed = sorted(line.rsplit(": ", 1)[1] for line in found.stdout.splitlines()
                    if line.startswith("file whose content differs from what was received"))
    assert listed == sorted(str(p.relative_to(store)) for p in rotted)
    assert "A damaged stored file" in found.stderr
    # --repair adopts files without rows: it would mend nothing here, so fsck does not
    # send the operator there (it did, for every inconsistency).
    assert "--repair" not in found.stdout
    dcmtk.storescu(edge_server.port, [study[0].path]).check()  # the modality sends it again
    edge_server.wait_for_log("stored file of an instance was missing or damaged")
    again_found = edge_server.cli("fsck", "--content", check=False)
    assert again_found.stdout.count("differs from what was received") == 1


def test_peer_bound_to_its_host_is_refused_from_another_address(edge_server: EdgeServer) -> None:
    edge_server.add_peer("bound-elsewhere", "BOUNDWS", 11115, host="192.0.2.7")
    edge_server.cli("peers", "remove", "bound-elsewhere")
    edge_server.cli("peers", "add", "bound-elsewhere", "--ae-title", "BOUNDWS", "--host",
                    "192.0.2.7", "--port", "11115", "--allow", "find", "--bind-host")
    assert not edge_server.echo(aet="BOUNDWS").ok
    edge_server.wait_for_log("AE title is bound to host '192.0.2.7'")
    edge_server.cli("peers", "remove", "bound-elsewhere")
    edge_server.cli("peers", "add", "bound-here", "--ae-title", "BOUNDWS", "--host",
                    "127.0.0.1", "--port", "11115", "--allow", "find", "--bind-host")
    assert edge_server.echo(aet="BOUNDWS").ok


@pytest.mark.parametrize("slip", [
    lambda good: good + "garbage = = \n",
    lambda good: good.replace("[peers.", "[[peers]]\n# [peers."),
], ids=["not-toml", "array-of-tables"])
def test_an_unreadable_allowlist_admits_no_peer_says_so_once_and_heals(
        edge_server: EdgeServer, slip: Callable[[str], str]) -> None:
    """A typo in a hand-edited peers.toml: serve rejects every association at once (it
    failed each with a traceback and left the peer waiting for an answer), logs the
    reason once, `status` warns, and the fixed file is read at the next association.
    So for [[peers]] (TOML, but not the allowlist's shape), which crashed every command
    that read the file and every association, the caller never answered."""
    peers = edge_server.home / "peers.toml"
    good = peers.read_text()
    assert edge_server.echo().ok
    peers.write_text(slip(good))
    for _ in range(2):
        refused = dcmtk.echoscu(edge_server.port, host=edge_server.host,
                                aec=edge_server.ae_title, timeout=20.0)
        assert not refused.ok and "Association Rejected" in refused.output, refused.output
    assert edge_server.log().count("peer allowlist cannot be read, admitting no peer") == 1
    assert "Traceback" not in edge_server.log()
    status = edge_server.cli("status")
    assert "the peer allowlist cannot be read, so serve admits no peer" in status.stderr
    peers.write_text(good)
    assert edge_server.echo().ok


def test_init_sets_the_cloud_url_and_refuses_a_bad_one(tmp_path: Path) -> None:
    run_pacs_edge("init", "--home", str(tmp_path / "a"), "--cloud", "azure://site-a")
    assert 'url = "azure://site-a"' in (tmp_path / "a" / "pacs-edge.toml").read_text()
    bad = run_pacs_edge("init", "--home", str(tmp_path / "b"), "--cloud", "ftp://x", check=False)
    assert bad.returncode == 2 and "cloud.url" in bad.stderr
    assert not (tmp_path / "b").exists()


def _one_error_line(result: subprocess.CompletedProcess[str], *wanted: str) -> str:
    """Exit 2 and, on stderr, one `error:` line (and at most a `hint:` line); returns it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert lines and lines[0].startswith("error: "), result.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), (
        result.stderr)
    for text in wanted:
        assert text in lines[0], result.stderr
    return lines[0]


def test_a_file_where_a_folder_should_be_is_one_error_line(
    edge_home: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    ports = ("--dicom-port", "0", "--tls-port", "0", "--hl7-port", "0", "--http-port", "0",
             "--metrics-port", "0")
    env = {**os.environ, "PACS_EDGE_HOME": str(blocker)}
    from_env = subprocess.run([*pacs_edge_command(), "init", *ports], env=env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    _one_error_line(from_env, "Not a directory", str(blocker))
    _one_error_line(run_pacs_edge("init", "--home", str(blocker / "sub"), *ports,
                                  check=False), "Not a directory", f"{blocker}/sub")
    _one_error_line(run_pacs_edge("reader", "init", "--home", str(blocker / "sub"), "--cloud",
                                  f"file://{tmp_path / 'cloud'}", check=False),
                    "Not a directory", str(blocker))
    _one_error_line(run_pacs_edge("certs", "issue", "ws1", "--home", str(edge_home), "--out",
                                  str(blocker / "sub"), check=False),
                    "Not a directory", str(blocker))
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    _one_error_line(run_pacs_edge("keys", "escrow", "--home", str(edge_home), "--out",
                                  str(tmp_path / "nodir" / "escrow.bin"), "--passphrase-file",
                                  str(passphrase), check=False),
                    "No such file or directory", str(tmp_path / "nodir"))
    # A folder the user may not write (root without capabilities: modes apply) is named
    # with the file asked for, not the temp name the write began with.
    usb = tmp_path / "usb"
    usb.mkdir()
    os.chown(usb, 65534, 65534)
    escrow = subprocess.run([*NO_CAPABILITIES, *pacs_edge_command(), "keys", "escrow",
                             "--home", str(edge_home), "--out", str(usb / "site.escrow"),
                             "--passphrase-file", str(passphrase)], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=CLI_TIMEOUT)
    assert _one_error_line(escrow) == f"error: Permission denied: {usb / 'site.escrow'}"


def test_store_and_index_paths_that_cannot_be_used_are_one_error_line(
    edge_home: Path, tmp_path: Path
) -> None:
    study = dicomgen.make_study(tmp_path / "in", seed=51, series_per_study=1,
                                 instances_per_series=1)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    server = EdgeServer(edge_home)
    server.configure(store={"path": blocker})
    _one_error_line(run_pacs_edge("import", "--home", str(edge_home), str(study[0].path),
                                  check=False), "Not a directory", str(blocker))
    server.configure(store={"path": "store"}, index={"path": blocker / "index.sqlite3"})
    _one_error_line(run_pacs_edge("status", "--home", str(edge_home), check=False),
                    str(blocker))
    server.configure(index={"path": "index.sqlite3"})
    (edge_home / "index.sqlite3").mkdir()
    _one_error_line(run_pacs_edge("status", "--home", str(edge_home), check=False),
                    str(edge_home / "index.sqlite3"))


@pytest.mark.parametrize("exc", [
    OSError("an OSError without errno"),
    OSError(errno.EBADF, "Bad file descriptor", "x"),
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    ValueError("a bug"),
], ids=["no-errno", "ebadf", "no-filename", "not-oserror"])
def test_an_oserror_that_is_a_bug_still_surfaces(exc: Exception) -> None:
    @expected_errors
    def command() -> None:
        raise exc

    with pytest.raises(type(exc)):
        command()


def test_import_rejects_pipes_and_symlink_loops_and_goes_on(
    edge_home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    study = dicomgen.make_study(folder / "study", seed=53)
    os.mkfifo(folder / "pipe.dcm")
    (folder / "loop.dcm").symlink_to("loop.dcm")
    # Without the type check, opening the pipe blocks until a writer comes: a hang.
    result = run_pacs_edge("import", "--home", str(edge_home), str(folder), check=False,
                           timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"stored {len(study)}" in result.stdout and "rejected 2" in result.stdout
    assert "pipe.dcm: not a regular file (named pipe)" in result.stderr
    assert "loop.dcm: symbolic link loop" in result.stderr
    assert "Traceback" not in result.stderr
    named = run_pacs_edge("import", "--home", str(edge_home), str(folder / "pipe.dcm"),
                          check=False, timeout=60)
    assert named.returncode == 1 and "rejected 1" in named.stdout
    assert "pipe.dcm: not a regular file (named pipe)" in named.stderr


def test_import_of_a_cd_passes_over_its_dicomdir_and_succeeds(
        edge_home: Path, tmp_path: Path) -> None:
    """The DICOMDIR of a CD was taken for an instance and rejected ("StudyInstanceUID is
    missing"): every CD import exited 1, the operator's sign not to trust it."""
    cd = tmp_path / "cdrom"
    copied = make_cd(cd, dicomgen.make_study(tmp_path / "study", seed=54))
    result = run_pacs_edge("import", "--home", str(edge_home), str(cd), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"stored {len(copied)}" in result.stdout and "rejected 0" in result.stdout
    named = run_pacs_edge("import", "--home", str(edge_home), str(cd / "DICOMDIR"),
                          check=False)
    assert named.returncode == 1 and "rejected 1" in named.stdout
    assert ("DICOMDIR: a DICOMDIR is the index of a CD's files, not an instance: import"
            " the folder that holds it") in named.stderr


def test_import_goes_on_past_a_file_it_cannot_read_to_its_end(
        edge_home: Path, tmp_path: Path) -> None:
    """A bad sector half-way through one file of a CD (EIO on read, after the header read
    well) ended the import with a traceback: no summary, the files after it not imported."""
    study = dicomgen.make_study(tmp_path / "media" / "study", seed=55, instances_per_series=2)
    scratched = study[0].path.relative_to(tmp_path / "media")
    with ScratchedMedia(tmp_path / "media", tmp_path / "cdrom",
                        {str(scratched): 4096}) as cdrom:
        result = run_pacs_edge("import", "--home", str(edge_home), str(cdrom), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"stored {len(study) - 1}" in result.stdout and "rejected 1" in result.stdout
    assert (f"rejected {tmp_path / 'cdrom' / scratched}: copy failed (input/output error)"
            in result.stderr), result.stderr
    assert list((edge_home / "store" / ".spool").iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_serve_on_a_home_in_use_is_refused_before_it_touches_the_home(
        workers: int, edge_server_factory: Callable[..., EdgeServer],
        small_study: list[dicomgen.GeneratedInstance]) -> None:
    """A second serve used to sweep the running one's transfers in flight (and reconcile
    the home as after a crash) before it failed on the DICOM port."""
    server = edge_server_factory(start=False)
    server.configure(dicom={"workers": workers})
    server.start()
    in_flight = server.home / "store" / ".spool" / "rx-in-flight.part"
    in_flight.write_bytes(b"half an instance")
    second = run_pacs_edge("serve", "--home", str(server.home), "--dicom-port",
                           str(server.port), check=False, timeout=60)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"pacs-edge serve already runs on data home {server.home} (pid {server.pid})" in (
        second.stderr)
    assert "hint: stop it first (systemctl stop pacs-edge)" in second.stderr
    assert "Traceback" not in second.stderr and "reconciling" not in second.stderr
    assert in_flight.read_bytes() == b"half an instance"
    assert stat.S_IMODE((server.home / "run" / "serve.lock").stat().st_mode) == 0o600
    # The other commands share the home with serve.
    assert json.loads(server.cli("status", "--json").stdout)["instances"] == 0
    dcmtk.storescu(server.port, [small_study[0].path]).check()
    in_flight.unlink()


@pytest.mark.parametrize(("key", "workers"), [("port", 1), ("tls_port", 1), ("port", 2)])
def test_a_dicom_port_in_use_is_one_error_line(
        key: str, workers: int, edge_home: Path, free_port: Callable[[], int]) -> None:
    """Found before the start-up sweep: the port's holder may be a serve older than the
    serve lock, still running during an upgrade, whose transfers in flight the sweep
    would take (an upgrade audit saw it with one worker)."""
    in_flight = edge_home / "store" / ".spool" / "rx-in-flight.part"
    in_flight.parent.mkdir(parents=True, exist_ok=True)
    in_flight.write_bytes(b"half an instance")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        EdgeServer(edge_home).configure(dicom={key: port, "workers": workers})
        result = run_pacs_edge("serve", "--home", str(edge_home), check=False, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert in_flight.read_bytes() == b"half an instance"
    assert "reconciling" not in result.stderr
    tls = " TLS" if key == "tls_port" else ""
    assert f"error: cannot listen for DICOM{tls} on 127.0.0.1:{port}: Address already in use" in (
        result.stderr)
    assert f"hint: choose another [dicom] {key}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_workers_start_up_error_is_one_line(
        edge_home: Path, free_port: Callable[[], int]) -> None:
    """Worker 0 runs the HTTPS server: its refusal is a log line, not the traceback
    multiprocessing prints for an exception in a process."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        EdgeServer(edge_home).configure(dicom={"workers": 2}, http={"port": port})
        result = run_pacs_edge("serve", "--home", str(edge_home), check=False, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error=cannot listen for HTTPS on 127.0.0.1:{port}" in result.stderr
    assert "error: worker 0 exited during start-up" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def _in_a_terminal(command: list[str], timeout: float = 120) -> str:
    """What `command` shows in a terminal (stdout and stderr on one pty), without the
    terminal's control sequences (colours, cursor moves)."""
    import pty

    main, secondary = pty.openpty()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=secondary,
                            stderr=secondary, env={**os.environ, "TERM": "xterm",
                                                   "COLUMNS": "100"})
    os.close(secondary)
    shown = bytearray()
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the command closed its end
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
        proc.wait(timeout)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    assert proc.returncode == 0, text
    return text


def test_sync_once_in_a_terminal_counts_the_studies_it_replicates(
        edge_home: Path, tmp_path: Path) -> None:
    """A pass over a backlog showed nothing until its first study was uploaded."""
    for n in range(3):
        dicomgen.make_study(tmp_path / "studies" / str(n), seed=40 + n, instances_per_series=1)
    run_pacs_edge("import", "--home", str(edge_home), str(tmp_path / "studies"))
    shown = _in_a_terminal([*pacs_edge_command(), "sync", "--once", "--stable-after", "0",
                            "--home", str(edge_home)])
    assert "replicating studies" in shown and "3/3" in shown, shown
    assert "replicated 3 study version(s)" in shown, shown


def test_the_run_folder_is_private_when_a_command_run_by_hand_makes_it(
        edge_home: Path) -> None:
    """docs/storage.md: `run/` is 0700 (serve's lock, the processes' metrics). The first
    process to start made it with the caller's umask, 0755 from a shell, since only
    `run/metrics` was given 0700; the units' UMask=0077 hid it."""
    before = os.umask(0o022)
    try:
        run_pacs_edge("sync", "--once", "--home", str(edge_home))
    finally:
        os.umask(before)
    assert stat.S_IMODE((edge_home / "run").stat().st_mode) == 0o700
    assert stat.S_IMODE((edge_home / "run" / "metrics").stat().st_mode) == 0o700
