"""The typed config: defaults, validation errors that name the key, overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import run_pacs_edge

from appliance.base.config import (
    Config,
    config_from_mapping,
    load_config,
    render_config_toml,
    resolve_home,
)
from appliance.base.errors import ConfigError, HomeError


def test_defaults_resolve_paths_inside_home(tmp_path: Path) -> None:
    config = config_from_mapping(tmp_path, {})
    assert config.dicom.ae_title == "EDGE"
    assert config.dicom.port == 11112
    assert config.dicom.host == "127.0.0.1"
    assert config.store.path == tmp_path / "store"
    assert config.index.path == tmp_path / "index.sqlite3"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"dicom": {"port": "104"}}, "dicom.port"),
        ({"dicom": {"port": 70000}}, "dicom.port"),
        ({"dicom": {"ae_title": "A" * 17}}, "dicom.ae_title"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"index": {"commit_window_ms": -1}}, "index.commit_window_ms"),
        ({"migrate": {"rate_per_hour": 10**20}}, "migrate.rate_per_hour"),
        ({"migrate": {"query_limit": 10**20}}, "migrate.query_limit"),
        # TOML's inf and nan passed every "> 0" check: session_max_hours = inf made every
        # login a 500, lockout_minutes = inf crashed `users list` once a user was locked.
        ({"auth": {"session_max_hours": float("inf")}}, "auth.session_max_hours"),
        ({"auth": {"session_max_hours": 10000.0}}, "auth.session_max_hours"),
        ({"auth": {"lockout_minutes": float("inf")}}, "auth.lockout_minutes"),
        ({"dicom": {"network_timeout": float("nan")}}, "dicom.network_timeout"),
        ({"dicom": {"network_timeout": 1e12}}, "dicom.network_timeout"),
    ],
)
def test_invalid_value_names_key_value_and_expectation(
    tmp_path: Path, raw: dict[str, dict[str, object]], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(tmp_path, raw)
    assert caught.value.key == key
    assert key in caught.value.message
    assert "expected" in caught.value.message


@pytest.mark.parametrize("key", ["http.recall_wait_seconds", "audit.flush_seconds"])
def test_a_refused_zero_is_not_said_to_be_in_range(tmp_path: Path, key: str) -> None:
    """0 is refused for these; the message said '0 to 600 seconds' (an operator who set 0
    to answer 503 at once read that 0 was valid)."""
    section, name = key.split(".")
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(tmp_path, {section: {name: 0}})
    assert "expected above 0, at most" in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    ("raw", "key", "said"),
    [
        ({"dicom": {"ae_tile": "EDGE"}}, "dicom.ae_tile", "did you mean 'ae_title'?"),
        ({"dikom": {"port": 104}}, "dikom", "did you mean 'dicom'?"),
        ({"dicom": {"nonsense": 1}}, "dicom.nonsense", "known: acse_timeout, ae_title, "),
    ],
)
def test_an_unknown_name_is_named_with_the_closest_known_one_not_its_value(
    tmp_path: Path, raw: dict[str, dict[str, object]], key: str, said: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(tmp_path, raw)
    assert caught.value.key == key
    assert f"unknown config {'key' if '.' in key else 'section'} {key!r}" in caught.value.message
    assert said in caught.value.message and "value" not in caught.value.message
    assert caught.value.hint is not None and "correct the name" in caught.value.hint


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0")
    for name in ("pacs-edge.toml", "peers.toml"):
        path = home / name
        text = path.read_text()
        path.write_text(text + "port = = 1\n")
        result = run_pacs_edge("config", "check", "--home", str(home), check=False)
        assert result.returncode != 0
        assert f"{name} is not valid TOML: Invalid value (at line" in result.stdout + result.stderr
        assert "invalid value '<file>'" not in result.stdout + result.stderr
        path.write_text(text)


def test_rendered_default_file_loads_back_to_the_defaults(tmp_path: Path) -> None:
    text = render_config_toml(dicom={"ae_title": "CT_EDGE", "port": 4242})
    assert "# This box's AE title" in text
    loaded = config_from_mapping(tmp_path, tomllib.loads(text))
    assert loaded.dicom.ae_title == "CT_EDGE"
    assert loaded.dicom.port == 4242
    assert loaded.store == config_from_mapping(tmp_path, {}).store


def test_command_line_overrides_are_validated(tmp_path: Path) -> None:
    config = Config(home=tmp_path)
    assert config.with_overrides(dicom={"port": 5000, "ae_title": None}).dicom.port == 5000
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(dicom={"port": -1})
    # Not "run `pacs-edge config check`": `init` meets this before any config file exists.
    assert caught.value.hint == "fix the option's value and run the command again"


def test_missing_home_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(HomeError) as caught:
        load_config(tmp_path / "nowhere")
    assert caught.value.hint is not None and "pacs-edge init" in caught.value.hint


def test_a_config_path_that_is_a_folder_is_named_not_called_missing(tmp_path: Path) -> None:
    """`init` keeps a folder in the config file's place, so "run init first" would loop."""
    (tmp_path / "pacs-edge.toml").mkdir()
    with pytest.raises(HomeError, match="is a folder, not the config file"):
        load_config(tmp_path)


def test_home_comes_from_flag_then_environment_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_EDGE_HOME", str(tmp_path / "env"))
    assert resolve_home(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv("PACS_EDGE_HOME")
    assert resolve_home(None) == Path("data").absolute()


def test_config_check_passes_on_a_fresh_home_and_names_every_bad_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0")
    fresh = run_pacs_edge("config", "check", "--home", str(home))
    assert "DICOM TLS certificates: node certificate valid until" in fresh.stdout
    assert fresh.stdout.rstrip().endswith("pacs-edge.toml: ok")

    (home / "secrets/site.key").chmod(0o644)
    (home / "secrets/names.key").write_bytes(b"short")
    (home / "tls/node.pem").write_text("not a certificate\n")
    credentials = tmp_path / "azure.txt"
    credentials.write_text("UseDevelopmentStorage=true\n")
    credentials.chmod(0o644)
    config = home / "pacs-edge.toml"
    text = config.read_text().replace('# credentials_file = ""',
                                      f'credentials_file = "{credentials}"')
    config.write_text(text.replace('url = ""', 'url = "azure://packs"', 1))

    bad = run_pacs_edge("config", "check", "--home", str(home), check=False)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "ok     peer allowlist" in bad.stdout and "ok     log key" in bad.stdout
    assert "site.key: secret file has mode 0644" in bad.stderr
    assert "names.key: secret file holds 5 bytes, expected 32" in bad.stderr
    assert "error  DICOM TLS certificates: DICOM TLS cannot load" in bad.stderr
    assert f"error  cloud: blob store open '{credentials}'" in bad.stderr
    assert f"chmod 600 {credentials}" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_config_that_is_not_utf8_is_one_error_line_in_every_command(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0")
    with (home / "pacs-edge.toml").open("ab") as fh:
        fh.write(b"# \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(home)
    assert "not UTF-8" in caught.value.message and "pacs-edge.toml" in caught.value.message
    for command in (("config", "check"), ("serve",), ("status",), ("peers", "list")):
        result = run_pacs_edge(*command, "--home", str(home), check=False, timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stdout + result.stderr
        assert len(lines) == 2 and lines[1].startswith("hint: "), result.stderr
        assert lines[0].startswith("error: ") and "pacs-edge.toml" in lines[0], result.stderr
        assert "is not UTF-8" in lines[0], result.stderr


def test_config_check_reports_two_listeners_on_one_port(tmp_path: Path) -> None:
    """[metrics] port equal to [dicom] port with the web server off: serve could not start,
    so config check must not pass it (the home's file, and a file checked alone)."""
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "11112", "--http-port", "0",
                  "--metrics-port", "11112")
    for args in (("--home", str(home)),
                 ("--home", str(home), "--config-file", str(home / "pacs-edge.toml"))):
        bad = run_pacs_edge("config", "check", *args, check=False)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert ("error  listeners: [dicom] port and [metrics] port both listen on"
                " 127.0.0.1:11112") in bad.stderr
    config = home / "pacs-edge.toml"
    config.write_text(config.read_text().replace("\nport = 11112\n\n", "\nport = 9464\n\n"))
    fixed = run_pacs_edge("config", "check", "--home", str(home), "--config-file", str(config))
    assert "ok     listeners: DICOM 11112, DICOM TLS 2762, HL7 2575, metrics 9464" in fixed.stdout


def test_config_check_of_a_file_alone_refuses_what_serve_would(tmp_path: Path) -> None:
    """--config-file and --peers-file check a file before it replaces the live one (the
    Ansible role's validate step): the loaders serve uses, no data home needed."""
    config, peers = tmp_path / "new.toml", tmp_path / "peers.new"
    config.write_text("[dicom]\nport = 11112\n\n[sync]\nevict_after_days = -1\n")
    bad = run_pacs_edge("config", "check", "--config-file", str(config), check=False)
    assert bad.returncode == 2 and "'sync.evict_after_days'" in bad.stderr, bad.stderr
    config.write_text("[dicom]\nport = 11112\n")
    good = run_pacs_edge("config", "check", "--config-file", str(config), "--home",
                         str(tmp_path / "not-yet"))
    assert good.stdout.rstrip().endswith(f"{config}: ok")
    entry = 'host = "10.0.0.{n}"\nport = 104\nallow = ["store"]\n'
    for text, problem in (
        ('[peers.ct1]\nae_title = "CT"\n' + entry.format(n=1)
         + '[peers.ct2]\nae_title = " CT "\n' + entry.format(n=2),
         "an AE title no other peer has (peers.ct1 has it)"),
        ('[peers.ct1]\nae_title = "C\\\\T"\n' + entry.format(n=1), "backslash"),
        ('[peers.ct1]\nae_title = "CT1"\n' + entry.format(n=1)
         + '[peers.ct1]\nae_title = "CT2"\n' + entry.format(n=2), "is not valid TOML"),
    ):
        peers.write_text(text)
        bad = run_pacs_edge("config", "check", "--peers-file", str(peers), check=False)
        assert bad.returncode == 2 and problem in bad.stderr, bad.stderr
    peers.write_text('[peers.ct1]\nae_title = "CT1"\n' + entry.format(n=1))
    good = run_pacs_edge("config", "check", "--peers-file", str(peers))
    assert "ok     peer allowlist" in good.stdout and "1 peer(s)" in good.stdout


def test_config_check_warns_when_the_viewer_folder_holds_no_build(tmp_path: Path) -> None:
    """A mistyped [http] viewer_root passed config check and showed only as 503 pages and a
    line in serve's journal; the check warns (serve runs without the viewer: exit 0)."""
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "18443")
    config = home / "pacs-edge.toml"
    config.write_text(config.read_text().replace('viewer_root = "auto"',
                                                 f'viewer_root = "{tmp_path / "ohif"}"'))
    checked = run_pacs_edge("config", "check", "--home", str(home))
    assert f"warn   viewer: no OHIF build in {tmp_path / 'ohif'}" in checked.stderr
    assert "run scripts/install-ohif.sh" in checked.stderr
    (tmp_path / "ohif").mkdir()
    (tmp_path / "ohif" / "index.html").write_text("<html></html>")
    checked = run_pacs_edge("config", "check", "--home", str(home))
    assert f"ok     viewer: {tmp_path / 'ohif'}" in checked.stdout
    assert "warn   viewer" not in checked.stderr


def test_config_check_warns_about_the_store_reserve_of_0_an_older_init_wrote(
        tmp_path: Path) -> None:
    """`init` writes every key at its default, and before the 64 MB default it wrote
    `reserve_mb = 0`: an upgraded box kept it, and with it the disk filled to its last
    block that the new default prevents, while config check said nothing (found by an
    upgrade audit from 7c535d4). The check warns and names the value to set (exit 0:
    serve runs with 0)."""
    home = tmp_path / "home"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0")
    config = home / "pacs-edge.toml"
    assert "\nreserve_mb = 64\n" in config.read_text()
    checked = run_pacs_edge("config", "check", "--home", str(home))
    assert "ok     store reserve: 64 MB" in checked.stdout
    assert "warn   store reserve" not in checked.stderr
    config.write_text(config.read_text().replace("\nreserve_mb = 64\n", "\nreserve_mb = 0\n"))
    checked = run_pacs_edge("config", "check", "--home", str(home))
    assert "warn   store reserve: [store] reserve_mb = 0: ingest takes the disk to its last" \
        " block" in checked.stderr
    assert "set [store] reserve_mb = 64 (the default" in checked.stderr
