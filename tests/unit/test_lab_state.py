"""Lab state without Docker: the operator key, known_hosts, the Prefect server's port preflight."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from primespark.errors import UserError
from primespark.fleet import load_fleet
from primespark.lab import ssh
from primespark.lab.prefect_server import PrefectServer

REPO = Path(__file__).resolve().parents[2]


def test_operator_key_is_made_once_private_0600_and_matches_its_public_half(tmp_path):
    public = ssh.operator_key(tmp_path, "spark-test")
    private = tmp_path / "ssh" / "id_ed25519"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ssh").stat().st_mode & 0o777 == 0o700
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    derived = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.split()[:2] == derived.decode().split()[:2]
    assert ssh.operator_key(tmp_path, "spark-test") == public  # not regenerated


def test_lost_public_half_is_derived_again_from_the_private_key(tmp_path):
    public = ssh.operator_key(tmp_path, "c")
    (tmp_path / "ssh" / "id_ed25519.pub").unlink()
    assert ssh.operator_key(tmp_path, "c") == public


def test_known_hosts_names_every_address_and_is_rewritten_only_on_change(tmp_path):
    fleet = load_fleet(str(REPO / "inventory" / "lab.yaml"))
    core = fleet.hosts["core-1"]
    names = ssh.known_host_names("core-1", core)
    assert names == ["core-1", str(core.ssh_address), str(core.public_address)]
    entries = {"core-1": (names, ["ssh-ed25519 AAAAkey"])}
    assert ssh.write_known_hosts(tmp_path, entries) is True
    assert ssh.write_known_hosts(tmp_path, entries) is False
    line = (tmp_path / "ssh" / "known_hosts").read_text().strip()
    assert line == f"core-1,{core.ssh_address},{core.public_address} ssh-ed25519 AAAAkey"


def test_ssh_uses_the_lab_key_known_hosts_and_the_fleet_user(tmp_path):
    fleet = load_fleet(str(REPO / "inventory" / "lab.yaml"))
    argv = ssh.ssh_argv(tmp_path, fleet, "pi-1", "hostname")
    assert f"{fleet.hosts['pi-1'].ssh.user}@{fleet.hosts['pi-1'].ssh_address}" in argv
    assert f"UserKnownHostsFile={tmp_path / 'ssh' / 'known_hosts'}" in argv
    assert "StrictHostKeyChecking=yes" in argv and argv[-1] == "hostname"


def test_prefect_port_taken_by_someone_else_is_a_clear_preflight_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = PrefectServer(tmp_path, port)
        assert not server.port_free()
        with pytest.raises(UserError, match=f"port {port}.*taken by another program") as err:
            server.preflight()
        assert "lab.prefect_port" in err.value.fix
    assert server.port_free()
    server.preflight()  # free again: no error
    assert server.pid() is None and not server.stop()


def test_lab_env_prints_vault_addr_and_the_token_only_when_asked(tmp_path, monkeypatch, request):
    import json

    from typer.testing import CliRunner

    from primespark.cli.app import app
    from primespark.lab.openbao import credentials_file
    from primespark.settings import get_settings

    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()  # the CLI's lab reads the cached settings: make them see this state dir
    request.addfinalizer(get_settings.cache_clear)
    # Without an orchestration section: the Prefect auth string (in the lab's OpenBao) is not the subject.
    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    del data["orchestration"]
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data))
    fleet = load_fleet(str(path))
    plain = CliRunner().invoke(app, ["lab", "env", "--env", str(path)])
    assert plain.exit_code == 0, plain.output
    assert f"export VAULT_ADDR=http://127.0.0.1:{fleet.lab.openbao_port}" in plain.stdout.splitlines()
    assert "VAULT_TOKEN" not in plain.stdout
    credentials_file(tmp_path).parent.mkdir(mode=0o700)
    credentials_file(tmp_path).write_text(json.dumps({"unseal_key": "k", "root_token": "s.root-of-the-lab"}))
    asked = CliRunner().invoke(app, ["lab", "env", "--env", str(path), "--vault-token"])
    assert asked.exit_code == 0 and "export VAULT_TOKEN=s.root-of-the-lab" in asked.stdout.splitlines()
    assert not any(line.endswith("=k") for line in asked.stdout.splitlines()), "never the unseal key"
