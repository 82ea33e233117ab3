"""The mesh planner without tunnels: stable addresses and keys, endpoints, keepalive, routes, rendering, errors."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from primespark.errors import UserError
from primespark.fleet.loader import validate_data
from primespark.fleet.model import Fleet
from primespark.mesh.health import MeshHealth, PairHealth, _parse, probe_rounds, write_metrics
from primespark.mesh.keys import public_key_of
from primespark.mesh.plan import load_state, state_path
from primespark.mesh.render import render_all, render_host
from primespark.mesh.service import current_plan, plan_and_save
from primespark.secrets import LocalSecretStore
from primespark.settings import get_settings

REPO = Path(__file__).resolve().parents[2]
INVALID = REPO / "tests" / "fixtures" / "fleet" / "invalid"


def lab_data() -> dict[str, Any]:
    return yaml.safe_load((get_settings().inventory_dir / "lab.yaml").read_text())


PARTIAL_MESH = frozenset({"prometheus-unreachable", "server-unreachable", "sync-no-route", "recall-no-route",
                          "tier-no-route"})


def fleet_with(members: list[str] | None = None, data: dict[str, Any] | None = None, **mesh: Any) -> Fleet:
    data = copy.deepcopy(data or lab_data())
    if members is not None:
        data["meshes"]["fleet"]["members"] = members
    data["meshes"]["fleet"].update(mesh)
    # These meshes leave lab hosts out on purpose; that Prometheus, the Prefect server or a sync destination could
    # then not be reached is not the subject.
    return validate_data(data, "test", skip=PARTIAL_MESH)


@pytest.fixture
def store(tmp_path: Path) -> LocalSecretStore:
    return LocalSecretStore(tmp_path / "secrets")


def snapshot(planned) -> dict[str, tuple[str, str]]:
    return {h: (str(c.address), c.public_key) for h, c in planned.plan.hosts.items()}


def test_adding_a_host_keeps_every_other_address_and_key(tmp_path, store):
    before = plan_and_save(fleet_with(["pi-1", "pi-2", "core-1"]), "fleet", tmp_path, store)
    after = plan_and_save(fleet_with(["pi-1", "pi-2", "nas-1", "core-1"]), "fleet", tmp_path, store)
    old, new = snapshot(before), snapshot(after)
    assert {h: new[h] for h in old} == old
    assert new["nas-1"][0] not in {a for a, _ in old.values()}
    assert list(after.diff.added) == ["nas-1"]
    assert after.diff.changed == {h: ["peers added: nas-1"] for h in old}
    assert after.keys_created == ["nas-1"]


def test_removing_a_host_keeps_the_others_and_never_reuses_its_address(tmp_path, store):
    before = plan_and_save(fleet_with(["pi-1", "pi-2", "pi-3", "core-1"]), "fleet", tmp_path, store)
    after = plan_and_save(fleet_with(["pi-1", "pi-3", "core-1"]), "fleet", tmp_path, store)
    kept = {h: v for h, v in snapshot(before).items() if h != "pi-2"}
    assert snapshot(after) == kept
    retired = str(before.plan.hosts["pi-2"].address)
    assert after.diff.removed == {"pi-2": retired}
    assert not store.exists("mesh/fleet/pi-2"), "a removed host's private key must leave the store"
    # The next host gets a fresh address, never the retired one; a returning host gets a fresh one too.
    again = plan_and_save(fleet_with(["pi-1", "pi-3", "core-1", "nas-1", "pi-2"]), "fleet", tmp_path, store)
    assert str(again.plan.hosts["nas-1"].address) != retired
    assert str(again.plan.hosts["pi-2"].address) != retired
    assert load_state(tmp_path, "fleet").retired == {retired: "pi-2"}


def test_replanning_an_unchanged_fleet_changes_nothing(tmp_path, store):
    fleet = fleet_with()
    first = plan_and_save(fleet, "fleet", tmp_path, store)
    text = state_path(tmp_path, "fleet").read_text()
    second = plan_and_save(fleet, "fleet", tmp_path, store)
    assert second.diff.empty and second.diff.unchanged == len(first.plan.hosts)
    assert state_path(tmp_path, "fleet").read_text() == text
    assert second.keys_created == [] and second.preshared_created == 0


def test_endpoints_keepalive_and_routes_follow_the_fleet(tmp_path, store):
    planned = plan_and_save(fleet_with(), "fleet", tmp_path, store)
    plan, keys = planned.plan, planned.keys
    pi = {p.name: p for p in plan.hosts["pi-1"].peers}
    core = {p.name: p for p in plan.hosts["core-1"].peers}
    # Same site: the LAN address, no keepalive (no NAT in between).
    assert pi["pi-2"].endpoint == "172.30.1.12:51820" and pi["pi-2"].keepalive is None
    # From behind NAT to a public host: its public address, and the NATed side keeps the mapping open.
    assert pi["core-1"].endpoint == "172.30.0.21:51820" and pi["core-1"].keepalive == 25
    # From the cloud to a NATed host: no endpoint (unreachable from outside), no keepalive.
    assert core["pi-1"].endpoint is None and core["pi-1"].keepalive is None
    assert core["stream-1"].endpoint == "172.30.2.12:51820"
    assert all(len(p.allowed_ips) == 1 and p.allowed_ips[0].endswith("/32") for p in pi.values())
    # A pair shares one preshared key; both configs carry it.
    pi_conf, core_conf = render_host(plan, keys, "pi-1"), render_host(plan, keys, "core-1")
    psk = keys.preshared_key("pi-1", "core-1")
    assert psk in pi_conf and psk in core_conf


def test_hub_and_spoke_routes_the_overlay_through_the_hub(tmp_path, store):
    fleet = fleet_with(topology="hub_and_spoke", hub="core-1")
    plan = plan_and_save(fleet, "fleet", tmp_path, store).plan
    for spoke, config in plan.hosts.items():
        if spoke == "core-1":
            continue
        assert [(p.name, p.allowed_ips) for p in config.peers] == [("core-1", ("10.99.0.0/24",))]
    hub = plan.hosts["core-1"]
    assert hub.forward and len(hub.peers) == len(plan.hosts) - 1
    assert all(p.allowed_ips == (f"{plan.hosts[p.name].address}/32",) for p in hub.peers)


def test_preshared_keys_can_be_switched_off(tmp_path, store):
    planned = plan_and_save(fleet_with(preshared_keys=False), "fleet", tmp_path, store)
    assert "PresharedKey" not in render_host(planned.plan, planned.keys, "pi-1")


def test_keys_live_in_the_store_not_in_the_plan(tmp_path, store):
    planned = plan_and_save(fleet_with(), "fleet", tmp_path, store)
    saved = state_path(tmp_path, "fleet").read_text()
    for host in planned.plan.hosts:
        private = planned.keys.private_key(host)
        assert private not in saved
        assert public_key_of(private) == json.loads(saved)["hosts"][host]["public_key"]
        secret_file = store.root / "mesh" / "fleet" / host
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_path(tmp_path, "fleet").stat().st_mode) == 0o600


def test_rendered_configs_are_private_and_parse_with_wg(tmp_path, store):
    planned = plan_and_save(fleet_with(), "fleet", tmp_path, store)
    written = render_all(planned.plan, planned.keys, tmp_path / "out")
    assert len(written) == 8
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.name.endswith(".wg0.conf")
    text = written[0].read_text()
    assert text.count("[Peer]") == 7 and "MTU = 1420" in text and "ListenPort = 51820" in text
    if os.access("/usr/bin/wg-quick", os.X_OK):
        stripped = subprocess.run(["wg-quick", "strip", str(written[0])], capture_output=True, text=True)
        assert stripped.returncode == 0, stripped.stderr
        assert "Address" not in stripped.stdout and stripped.stdout.count("PublicKey") == 7


def test_acting_on_a_stale_plan_is_refused(tmp_path, store):
    plan_and_save(fleet_with(["pi-1", "core-1"]), "fleet", tmp_path, store)
    with pytest.raises(UserError, match="changed since"):
        current_plan(fleet_with(["pi-1", "pi-2", "core-1"]), "fleet", tmp_path, store)
    with pytest.raises(UserError, match="no saved plan"):
        current_plan(fleet_with(), "fleet", tmp_path / "elsewhere", store)


def test_changing_the_overlay_or_exhausting_it_is_a_clear_error(tmp_path, store):
    plan_and_save(fleet_with(["pi-1", "pi-2"]), "fleet", tmp_path, store)
    with pytest.raises(UserError, match="overlay changed"):
        plan_and_save(fleet_with(["pi-1", "pi-2"], overlay="10.98.0.0/24"), "fleet", tmp_path, store)
    # A /29 holds 6 hosts; with two retired addresses only four are left for new ones.
    small = tmp_path / "small"
    plan_and_save(fleet_with(["pi-1", "pi-2", "pi-3"], overlay="10.99.0.0/29"), "fleet", small, store)
    plan_and_save(fleet_with(["pi-3"], overlay="10.99.0.0/29"), "fleet", small, store)
    with pytest.raises(UserError, match=r"no address left.*retired"):
        plan_and_save(fleet_with(["pi-3", "nas-1", "core-1", "stream-1", "ops-1", "analytics-1"],
                                 overlay="10.99.0.0/29"), "fleet", small, store)


@pytest.mark.parametrize(("fixture", "expected"), [
    ("overlay-too-small.yaml", "holds 2 hosts but the mesh has"),
    ("hub-without-endpoint.yaml", "has no endpoint"),
    ("hub-behind-nat.yaml", "sits behind NAT"),
    ("two-meshes-one-port.yaml", "listen port 51820"),
])
def test_bad_mesh_input_is_a_located_error_without_traceback(tmp_path, fixture, expected):
    env = {**os.environ, "SPARK_STATE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "primespark.cli.app", "mesh", "plan", "--env", str(INVALID / fixture)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 1
    assert expected in done.stderr and "meshes." in done.stderr and "fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mesh").exists()


@pytest.mark.parametrize("topology", [{}, {"topology": "hub_and_spoke", "hub": "core-1"}])
def test_health_probe_opens_each_direct_pair_from_one_end_only(tmp_path, store, topology):
    plan = plan_and_save(fleet_with(**topology), "fleet", tmp_path, store).plan
    first, second = probe_rounds(plan)
    name_of = {str(c.address): n for n, c in plan.hosts.items()}
    opened = {(source, name_of[a]) for source, addresses in first.items() for a in addresses}
    later = {(source, name_of[a]) for source, addresses in second.items() for a in addresses}
    every = {(s, t) for s in plan.hosts for t in plan.hosts if s != t}
    assert opened | later == every and not opened & later
    direct = {tuple(sorted(pair)) for pair in plan.peer_pairs()}
    # Exactly one end of each direct pair speaks first (crossing first handshakes stall for 15 s) ...
    assert sorted(tuple(sorted(pair)) for pair in opened) == sorted(direct)
    for source, target in opened:
        # ... and it is an end that knows where the other is.
        assert next(p for p in plan.hosts[source].peers if p.name == target).endpoint is not None
    assert ("pi-1", "core-1") in opened  # the cloud has no endpoint for a NATed Pi: the Pi calls in
    if topology:
        assert ("pi-1", "pi-2") in later and ("pi-2", "pi-1") in later  # through the hub, once it is up


def test_health_probe_output_is_parsed_and_exported(tmp_path):
    probe = _parse("ping 10.99.0.2 ok 0.412\nping 10.99.0.3 down\nnow 1000\n"
                   "peer\tKEY2=\t1.2.3.4:51820\t990\t10\t20\npeer\tKEY3=\t(none)\t0\t0\t0\n")
    assert probe.pings == {"10.99.0.2": 0.412, "10.99.0.3": None}
    assert probe.handshakes == {"KEY2=": 990, "KEY3=": 0} and probe.now == 1000
    health = MeshHealth("fleet", [PairHealth("a", "b", True, True, 0.4, 10.0),
                                  PairHealth("a", "c", True, False, None, None)])
    assert [p.target for p in health.down] == ["c"] and not health.healthy
    path = write_metrics(health, tmp_path / "mesh.prom")
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    assert families["spark_mesh_pairs_down"].samples[0].value == 1
    up = {s.labels["target"]: s.value for s in families["spark_mesh_pair_up"].samples}
    assert up == {"b": 1.0, "c": 0.0}


def test_ssh_runner_uses_the_fleet_ssh_settings_and_sudo(tmp_path, monkeypatch):
    import shlex

    from primespark.hosts import SshFiles, SshHosts

    ssh = tmp_path / "ssh"
    ssh.mkdir()
    (ssh / "id_ed25519").write_text("key")
    (ssh / "known_hosts").write_text("")
    runner = SshHosts(fleet_with(), SshFiles.of(tmp_path)).runner("pi-1")
    argv = runner.argv(["sh", "-c", "wg show wg0 dump | awk '{print $1}'"])  # type: ignore[attr-defined]
    assert argv[-2] == "spark@172.30.1.11" and argv[argv.index("-p"):argv.index("-p") + 2] == ["-p", "22"]
    assert str(ssh / "id_ed25519") in argv and f"UserKnownHostsFile={ssh / 'known_hosts'}" in argv
    remote = shlex.split(argv[-1])
    assert remote[:4] == ["sudo", "-n", "sh", "-c"] and remote[4] == "wg show wg0 dump | awk '{print $1}'"


def test_a_store_that_cannot_answer_fails_the_plan_and_never_makes_new_keys(tmp_path, fresh_vault):
    """Only "no such key" may lead to a new WireGuard key: a store that refuses or cannot answer (sealed, a
    policy without read) must not rotate every host's key behind the operator's back."""
    from primespark.secrets import SecretError, SecretStoreSealed, VaultSecretStore

    root = fresh_vault.client()
    store = VaultSecretStore(fresh_vault.address, "secret", "primespark/lab", token=fresh_vault.root_token)
    fleet = fleet_with(["pi-1", "pi-2", "core-1"])
    before = snapshot(plan_and_save(fleet, "fleet", tmp_path, store))
    root.sys.create_or_update_acl_policy(name="write-only", policy=(
        'path "secret/data/primespark/lab/mesh/*" { capabilities = ["create", "update"] }'))
    token = root.auth.token.create(policies=["write-only"], ttl="10m")["auth"]["client_token"]
    blind = VaultSecretStore(fresh_vault.address, "secret", "primespark/lab", token=token)
    with pytest.raises(SecretError, match=r"permission denied \(403\) reading secret/primespark/lab/mesh/fleet/"):
        plan_and_save(fleet, "fleet", tmp_path, blind)
    fresh_vault.seal()
    with pytest.raises(SecretStoreSealed, match="secret store sealed"):
        plan_and_save(fleet, "fleet", tmp_path, store)
    fresh_vault.unseal()
    again = plan_and_save(fleet, "fleet", tmp_path, store)
    assert snapshot(again) == before and not again.keys_created
