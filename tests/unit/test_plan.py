"""`spark plan` end to end through the CLI, and `spark preview|up` (skipped where Pulumi is missing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPARK = [sys.executable, "-m", "primespark.cli.app"]


def spark(*args: str, state: Path, path: str | None = None,
          root: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"SPARK_STATE_DIR": str(state), "PATH": path if path is not None else "/usr/bin:/bin",
           "HOME": str(state), "COLUMNS": "200", **({"SPARK_ROOT": str(root)} if root else {})}
    return subprocess.run([*SPARK, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                          check=False)


def test_plan_homelab_prints_the_tree_and_no_violation(tmp_path):
    result = spark("plan", "--env", "homelab", state=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("primespark-homelab", "libvirt:index/domain:Domain core-1", "4 vCPU, 8192 MiB",
                     "qemu+ssh://spark@203.0.113.20/system", "0 violations (0 mandatory)"):
        assert expected in out
    assert "Traceback" not in result.stderr


def test_plan_of_an_over_committed_kvm_host_fails(tmp_path):
    result = spark("plan", "--env", "tests/fixtures/cloud/overcommit.yaml", state=tmp_path)
    assert result.returncode == 1
    assert "[kvm-capacity] KVM host kvm-1 is over-committed" in result.stdout
    assert "147456 MiB" in result.stdout


def test_plan_of_a_broken_fleet_is_a_located_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "inventory/homelab.yaml").read_text().replace("cpus: 8\n", "cpus: many\n", 1))
    result = spark("plan", "--env", str(bad), state=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "bad.yaml" in result.stderr and "cpus" in result.stderr


@pytest.mark.parametrize("command", ["preview", "up", "destroy"])
def test_without_the_pulumi_cli_they_say_how_to_install_it(tmp_path, command):
    confirmed = ["--yes"] if command == "destroy" else []
    result = spark(command, "lab", *confirmed, state=tmp_path, path=str(tmp_path))  # a PATH without pulumi
    assert result.returncode == 1
    assert "the `pulumi` CLI is not installed" in result.stderr and "get.pulumi.com" in result.stderr
    assert "Traceback" not in result.stderr


def _libvirt_plugin() -> bool:
    found = shutil.which("pulumi")
    if not found:
        return False
    listing = subprocess.run([found, "plugin", "ls"], capture_output=True, text=True, check=False).stdout
    return "libvirt" in listing


def _missing() -> str:
    if shutil.which("pulumi") is None:
        return "the pulumi CLI is not installed here"
    return "" if _libvirt_plugin() else "the pulumi libvirt resource plugin is not installed here"


@pytest.mark.skipif(bool(_missing()), reason=_missing() or "-")
def test_preview_and_up_against_libvirt_test_driver(tmp_path):
    """Against libvirt's built-in `test:///default` driver, with the file backend under a scratch state dir. The
    stack's config file lives in a project folder of the test's own (the checkout's parts linked in), not in the
    checkout."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "Pulumi.yaml").write_text((REPO / "Pulumi.yaml").read_text())
    for part in ("stacks", "policies", "inventory", "src"):
        (project / part).symlink_to(REPO / part)
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (project / "Pulumi.libvirt-test.yaml").write_text(
        "config:\n  primespark:fleet: lab\n  primespark:vaultAddress: http://127.0.0.1:8200\n"
        "  primespark:libvirtUri: test:///default\n  primespark:manageVault: false\n"
        f"  primespark:imageCache: {tmp_path}\n  primespark:poolPath: {tmp_path}/pool\n")
    sha = "0" * 64  # lab's placeholder pin: give the cache a file of that name so `up` does not download
    (tmp_path / f"{sha}.qcow2").write_bytes(b"")
    env_path = str(Path(shutil.which("pulumi")).parent) + ":/usr/bin:/bin"  # type: ignore[arg-type]
    preview = spark("preview", "--env", "libvirt-test", state=tmp_path, path=env_path, root=project)
    assert preview.returncode == 0, preview.stdout + preview.stderr
    up = spark("up", "--env", "libvirt-test", state=tmp_path, path=env_path, root=project)
    assert up.returncode == 0, up.stdout + up.stderr
    assert (tmp_path / "stack-outputs.json").is_file()
    assert not (REPO / "Pulumi.libvirt-test.yaml").exists()
