"""Bad input and unreachable services at the CLI: one or two lines saying what is wrong, never a traceback, and
never a wrong "ok"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lab_fleets import lab_fleet

from primespark.fleet import load_fleet
from primespark.preflight import inventory_for

REPO = Path(__file__).resolve().parents[2]
SPARK = [sys.executable, "-m", "primespark.cli.app"]


def spark(*args: str, state: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARK_STATE_DIR": str(state), "COLUMNS": "200", **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    env.update(extra_env or {})
    return subprocess.run([*SPARK, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=180,
                          stdin=subprocess.DEVNULL)


def one_clean_error(done: subprocess.CompletedProcess[str], *said: str) -> None:
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    for text in said:
        assert text in done.stderr, done.stderr


def test_an_empty_env_is_a_clear_error(tmp_path: Path) -> None:
    done = spark("mesh", "plan", "--env", "", state=tmp_path / "state")
    one_clean_error(done, "no environment named", "fix:")
    assert "Is a directory" not in done.stderr


@pytest.mark.parametrize("last", ["0", "-1"])
def test_drill_report_needs_at_least_one_row(tmp_path: Path, last: str) -> None:
    done = spark("drill", "report", "--env", "lab", "--last", last, state=tmp_path / "state")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--last" in done.stderr and "1" in done.stderr


def test_backup_now_on_a_fleet_without_backups_says_so(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    del data["backup"]
    fleet = tmp_path / "nobackup.yaml"
    fleet.write_text(yaml.safe_dump(data))
    done = spark("backup", "now", "--env", str(fleet), "--transport", "local", state=tmp_path / "state")
    one_clean_error(done, "has no backup policy", "add a `backup:` section")


def dead_url() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


@pytest.mark.parametrize("command", [["backup", "now"], ["drill", "run"]])
def test_a_dead_prefect_server_is_named_with_how_to_start_the_labs(tmp_path: Path, command: list[str]) -> None:
    url = dead_url()
    fleet = lab_fleet(tmp_path, {"backend": "local"})  # the lab's own OpenBao runs only under `spark lab up`
    done = spark(*command, "pi-1", "--env", fleet, "--transport", "local", state=tmp_path / "state",
                 extra_env={"PREFECT_API_URL": url})
    one_clean_error(done, f"the Prefect server at {url}", "PREFECT_API_URL in the environment", "is unreachable",
                    "spark lab up")
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


@pytest.mark.parametrize("auth", ["lab", "token"])
def test_tls_renew_with_the_secret_store_unreachable_is_its_one_error(tmp_path: Path, auth: str) -> None:
    """The lab's OpenBao (or a Vault at an address) not answering: the command's one located error, no audit
    warning before it, no traceback; its audit record is written all the same, its values redacted, saying why."""
    from primespark.audit.chain import records

    address = dead_url().removesuffix("/api")
    state = tmp_path / "state"
    if auth == "lab":  # the lab's OpenBao was set up (its token is here) and is not running now
        fleet = lab_fleet(tmp_path, {"backend": "vault", "auth": "lab"})
        data = yaml.safe_load(Path(fleet).read_text())
        data["lab"]["openbao_port"] = int(address.rsplit(":", 1)[1])
        Path(fleet).write_text(yaml.safe_dump(data))
        (state / "openbao").mkdir(parents=True, mode=0o700)
        state.chmod(0o700)
        (state / "openbao" / "init.json").write_text(json.dumps({"root_token": "s.labrootlabrootlabroot12"}))
        fix = "spark lab up --env lab"
    else:
        fleet = lab_fleet(tmp_path, {"backend": "vault", "address": address, "auth": "token"})
        fix = "check the address and that the server runs"
    done = spark("tls", "renew", "--env", fleet, "--host", "pi-1", "--dir", str(tmp_path / "tls"), state=state,
                 extra_env={"VAULT_TOKEN": "s.notarealtokennotarealtoken"})
    one_clean_error(done, fix)
    error, fix_line = done.stderr.splitlines()  # exactly the one error and its fix
    assert error == (f"error: secret store unreachable: no answer from Vault at {address} while renewing pi-1's "
                     "certificate (ConnectionError)")
    assert fix_line.startswith("    fix: ") and done.stdout == ""
    (record,) = records(state / "audit" / "log.jsonl")
    assert record["operation"] == "spark tls renew" and record["outcome"] == "failed"
    assert "renewing pi-1's certificate" in record["error"]
    assert record["parameters"]["folder"] == "redacted (no audit key)"  # fail closed: no key, no value
    assert record["hmac_key"].startswith("unavailable: SecretStoreUnreachable: ")


def test_destroy_without_a_terminal_needs_yes(tmp_path: Path) -> None:
    done = spark("destroy", "--env", "lab", state=tmp_path / "state")
    one_clean_error(done, "refusing without --yes", "every resource of the lab stack", "--yes")
    assert not (tmp_path / "state" / "pulumi").exists(), "destroy went on to open the stack"


def test_preflight_takes_a_fleet_file_path(tmp_path: Path) -> None:
    """A fleet file given by its path gets an inventory of its own for Ansible, not "no Ansible inventory"."""
    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    data["name"] = "elsewhere"
    fleet_file = tmp_path / "elsewhere.yaml"
    fleet_file.write_text(yaml.safe_dump(data))
    done = spark("preflight", "--env", str(fleet_file), "--timeout", "0.2", state=tmp_path / "state")
    assert "no Ansible inventory" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "preflight: elsewhere" in done.stdout and "pi-1" in done.stdout, done.stdout

    # the inventory made for it is one Ansible reads, with the fleet's hosts
    with inventory_for(str(fleet_file), load_fleet(str(fleet_file))) as inventory:
        listed = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(inventory),
                                 "--list"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                env={**os.environ, "SPARK_STATE_DIR": str(tmp_path / "state"),
                                     "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")})
    assert listed.returncode == 0, listed.stderr
    hostvars = json.loads(listed.stdout)["_meta"]["hostvars"]
    assert "elsewhere" in json.dumps(hostvars["pi-1"]["spark_fleet"]) and "nas-1" in hostvars
    assert not inventory.exists(), "the temporary inventory was left behind"


def test_every_commands_usage_line_names_only_what_it_takes() -> None:
    """The old positional environment is hidden: no usage line shows it (Typer printed it as an empty `[]`)."""
    import typer

    from primespark.cli.app import app

    def usages(command: object, path: tuple[str, ...]):  # type: ignore[no-untyped-def]
        context = typer.Context(command, info_name=" ".join(path))  # type: ignore[arg-type]
        yield path, command.get_usage(context)  # type: ignore[attr-defined]
        for name in getattr(command, "list_commands", lambda _: [])(context):  # groups load when asked for
            yield from usages(command.get_command(context, name), (*path, name))  # type: ignore[attr-defined]

    found = dict(usages(typer.main.get_command(app), ("spark",)))
    assert ("spark", "mesh", "plan") in found and ("spark", "validate") in found
    bad = {" ".join(path): usage for path, usage in found.items() if "[]" in usage}
    assert not bad, bad


def test_a_command_loads_its_own_group_and_no_other() -> None:
    """`spark sync ...` must not pay for importing the lab's Docker client or Ansible's runner at every start;
    `spark --help` still lists every group, and a mistyped one is still suggested."""
    probe = """
import sys
from typer.testing import CliRunner
from primespark.cli.app import app
runner = CliRunner()
sync_help = runner.invoke(app, ["sync", "run", "--help"])
assert sync_help.exit_code == 0 and "--dry-run" in sync_help.output, sync_help.output
print(sorted(m for m in ("docker", "ansible_runner", "primespark.cli.lab", "primespark.cli.backup",
                         "primespark.inventory") if m in sys.modules))
every = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
print(every.output)
typo = runner.invoke(app, ["synk"], env={"COLUMNS": "200"})
print(typo.output)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded, rest = done.stdout.split("\n", 1)
    assert loaded == "[]", f"`spark sync run --help` imported {loaded}"
    for group in ("lab", "mesh", "backup", "drill", "secrets", "flows", "sync", "tier", "task", "host",
                  "monitoring", "audit", "tls", "validate", "preflight"):
        assert f" {group} " in rest, f"`spark --help` does not list {group}"
    assert "Did you mean 'sync'" in rest, rest
