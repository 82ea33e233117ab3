"""The restic role and what it installs: defaults agree with the fleet model; key material is stable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from lab_fleets import lab_fleet

from primespark.backup.repositories import host_material
from primespark.fleet import load_fleet
from primespark.fleet.model import Backup
from primespark.vault_server import DevServer

ROOT = Path(__file__).resolve().parents[2]


def test_role_default_matches_the_fleet_model() -> None:
    defaults = yaml.safe_load((ROOT / "roles/restic/defaults/main.yml").read_text())
    assert defaults["restic_client_dir"] == Backup.model_fields["client_dir"].default
    specs = yaml.safe_load((ROOT / "roles/restic/meta/argument_specs.yml").read_text())
    assert specs["argument_specs"]["main"]["options"]["restic_client_dir"]["default"] == defaults["restic_client_dir"]


def test_material_per_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    env = lab_fleet(tmp_path, {"backend": "local"})
    fleet = load_fleet(env)
    assert fleet.backup is not None
    pi1 = host_material(env, "pi-1")
    assert [(k["client"], k["account"]) for k in pi1["client_keys"]] == [("pi-1", "backup-pi-1")]  # type: ignore[index]
    private = serialization.load_ssh_private_key(pi1["client_keys"][0]["private_key"].encode(), None)  # type: ignore[index]
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert pi1["public_keys"] == [pi1["client_keys"][0]["public_key"]]  # type: ignore[index]
    assert pi1["public_keys"][0].startswith(public.decode())  # type: ignore[index]
    assert {r["url"] for r in pi1["repositories"]} == {  # type: ignore[attr-defined]
        f"sftp://backup-pi-1@{fleet.hosts['nas-1'].address}:22//repo",
        f"sftp://backup-pi-1@{fleet.hosts['ops-1'].public_address}:22//repo",  # offsite: another site
    }
    # the scratch host holds every client's key (it restores them all) but publishes none of its own
    scratch = host_material(env, fleet.backup.drill.scratch_host)
    assert {k["client"] for k in scratch["client_keys"]} == set(fleet.backup.plans)  # type: ignore[union-attr]
    assert scratch["public_keys"] == []
    # made once: a second call returns the same secrets; files are 0600
    assert host_material(env, "pi-1") == pi1
    for path in (tmp_path / "secrets" / "restic").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o600, path


def test_parallel_lookups_agree_on_every_secret_in_vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          vault: DevServer, vault_prefix: str) -> None:
    """Ansible runs the lookup for many hosts at once (forks): the scratch host and pi-1 must get one key, and
    each repository one password, through Vault's check-and-set as the lab's OpenBao does it."""
    import multiprocessing

    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("VAULT_TOKEN", vault.root_token)
    env = lab_fleet(tmp_path, {"backend": "vault", "address": vault.address, "prefix": vault_prefix})
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(host_material, [(env, h) for h in ("pi-1", "pi-3", "pi-2", "pi-3")])
    own = {k["client"]: k["private_key"] for r in results[:1] for k in r["client_keys"]}  # type: ignore[attr-defined]
    scratch = {k["client"]: k["private_key"] for k in results[1]["client_keys"]}  # type: ignore[index]
    assert own["pi-1"] == scratch["pi-1"]
    passwords = {(r["repository"], r["password"]) for res in results for r in res["repositories"]}  # type: ignore[attr-defined]
    assert len({repo for repo, _ in passwords}) == len(passwords)  # one password per repository
    stored = {name: vault.client().secrets.kv.v2.read_secret_version(
        path=f"primespark/lab/restic/{name}", mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
        ["password"] for name, _ in passwords}
    assert dict(passwords) == stored  # where the lab's vault: references point
    assert not (tmp_path / "secrets").exists(), "nothing in a local store"
