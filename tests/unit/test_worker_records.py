"""A site's worker never makes a restic repository: it opens those the controller recorded and delivered to it.

Real restic, local folders as repositories, every host this machine (the local transport): the controller is a
state directory, each worker another, set up as the prefect_worker role sets its flows up (SPARK_WORKER_SITE, a
read-only store with its site's passwords). `spark flows deploy`'s first step (`prepare_workers`) makes and
records the repositories here and writes each worker's records file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from primespark.backup import jobs, records
from primespark.backup.records import RepositoryMissing, RepositoryNotRecorded
from primespark.backup.repositories import password
from primespark.context import FleetContext
from primespark.errors import StepFailed, UserError
from primespark.orchestration.deploy import DeployReport, prepare_workers, worker_records_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fleet(tmp_path: Path) -> str:
    """The lab fleet (its workers: nas-1 for the edge, ops-1 for the cloud) with pi-1's plan backing up a folder
    here into the folder `nas`, copied offsite into `cloud`, and a local secret store."""
    data = yaml.safe_load((ROOT / "inventory" / "lab.yaml").read_text())
    data["secrets"] = {"backend": "local"}
    spec = data["backup"]
    for name, repository in spec["repositories"].items():
        repository["password"] = f"local:restic/{name}"
    spec["repositories"]["nas-primary"]["path"] = str(tmp_path / "nas")
    spec["repositories"]["offsite"]["path"] = str(tmp_path / "cloud")
    src = tmp_path / "src" / "pi-1"
    src.mkdir(parents=True)
    (src / "notes.txt").write_text("pi-1 notes\n")
    (src / "data.bin").write_bytes(os.urandom(20_000))
    spec["plans"] = {"pi-1": {"repository": "nas-primary", "paths": [str(src)]}}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture
def controller(fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FleetContext:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "controller"))
    for name in ("SPARK_WORKER_SITE", "SPARK_SECRET_READ_ONLY"):
        monkeypatch.delenv(name, raising=False)
    return FleetContext.load(fleet, "local")


def install_worker(controller: FleetContext, host: str, repositories: list[str]) -> Path:
    """The worker's state directory as its role leaves it: 0700, its site's passwords as 0600 files."""
    state = Path(worker_records_file(controller, host)).parent
    (state / "secrets" / "restic").mkdir(parents=True, mode=0o700)
    for folder in (state, state.parent, state / "secrets", state / "secrets" / "restic"):
        folder.chmod(0o700)
    for name in repositories:
        secret = state / "secrets" / "restic" / name
        secret.write_text(password(controller, name, create=True))
        secret.chmod(0o600)
    return state


def as_worker(fleet: str, site: str, state: Path, monkeypatch: pytest.MonkeyPatch) -> FleetContext:
    """The environment the prefect_worker role gives its flows."""
    monkeypatch.setenv("SPARK_STATE_DIR", str(state))
    monkeypatch.setenv("SPARK_WORKER_SITE", site)
    monkeypatch.setenv("SPARK_SECRET_READ_ONLY", "1")
    return FleetContext.load(fleet, "local")


def test_a_worker_with_no_record_makes_no_repository_and_says_what_to_run(
        controller: FleetContext, fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker set up while the NAS volume was not mounted: no repository, no record. Its backup is refused,
    naming the repository, the folder and the commands that fix it; `restic init` never ran."""
    state = install_worker(controller, "nas-1", ["nas-primary"])
    worker = as_worker(fleet, "edge", state, monkeypatch)
    repo = tmp_path / "nas" / "pi-1" / "repo"
    with pytest.raises(RepositoryNotRecorded) as refused:
        jobs.backup_host(worker, "pi-1")
    assert "the restic repository of pi-1 in nas-primary was never initialised by this environment" in \
        refused.value.message and str(repo) in refused.value.message, refused.value.message
    assert "spark flows deploy --env lab" in refused.value.fix, refused.value.fix
    assert "spark backup init nas-primary --client pi-1 --env lab" in refused.value.fix, refused.value.fix
    assert not repo.exists() and not (tmp_path / "nas").exists(), "a worker made a repository"
    assert not records.records_path(state).exists()

    # the same first use from the controller (the operator's machine) still makes and records it
    made = jobs.backup_host(controller, "pi-1")
    assert made.created_repository and (repo / "config").is_file()
    assert records.find(controller.state_dir, "nas-primary", "pi-1") is not None
    # there now, but not in the worker's records: not adopted either
    with pytest.raises(RepositoryNotRecorded, match="is not in this worker's records") as unknown:
        jobs.backup_host(worker, "pi-1")
    assert "spark flows deploy --env lab" in unknown.value.fix
    assert not records.records_path(state).exists(), "the worker wrote records of its own"


def test_with_the_records_deploy_delivers_the_worker_opens_the_repository_and_a_missing_one_is_refused(
        controller: FleetContext, fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = install_worker(controller, "nas-1", ["nas-primary"])
    install_worker(controller, "ops-1", ["offsite"])
    report = DeployReport()
    assert prepare_workers(controller, report) == []
    ids = {k: r.id[:8] for k, r in records.load(controller.state_dir).items()}
    assert sorted(report.created) == [
        f"repository nas-primary/pi-1 (initialised, id {ids['nas-primary/pi-1']})",
        f"repository offsite/pi-1 (initialised, id {ids['offsite/pi-1']})",
        "repository records of nas-1's worker (edge)", "repository records of ops-1's worker (cloud)"], report
    delivered = records.records_path(state)
    assert oct(delivered.stat().st_mode & 0o777) == "0o600"
    assert set(records.load(state)) == {"nas-primary/pi-1", "offsite/pi-1"}
    again = DeployReport()  # a second deploy changes nothing: repositories as recorded, records as delivered
    assert prepare_workers(controller, again) == [] and not again.changed, again

    worker = as_worker(fleet, "edge", state, monkeypatch)
    text = delivered.read_text()
    done = jobs.backup_host(worker, "pi-1")
    assert not done.created_repository and done.run.summary.snapshot_id
    assert delivered.read_text() == text, "the worker rewrote the controller's records"

    # the NAS folder gone (an unmounted volume): refused with the delivered record, never made again
    repo = tmp_path / "nas" / "pi-1" / "repo"
    repo.rename(repo.with_name("repo.aside"))
    with pytest.raises(RepositoryMissing, match="refusing to start a new, empty one") as missing:
        jobs.backup_host(worker, "pi-1")
    assert "spark flows deploy --env lab" in missing.value.fix, missing.value.fix
    assert not repo.exists()


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"nas-primary/pi-1": {"id": "abc"}}'])
def test_a_records_file_the_worker_cannot_read_fails_closed(
        controller: FleetContext, fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    """Read as "no records", the file would let nothing through on a worker but would let the controller make the
    repositories again: it is an error everywhere, naming the file and how to get it back."""
    state = install_worker(controller, "nas-1", ["nas-primary"])
    records.records_path(state).write_text(damage)
    worker = as_worker(fleet, "edge", state, monkeypatch)
    with pytest.raises(StepFailed, match="cannot be read") as unreadable:
        jobs.backup_host(worker, "pi-1")
    assert str(records.records_path(state)) in unreadable.value.message
    assert "spark flows deploy --env lab" in unreadable.value.fix, unreadable.value.fix
    assert not (tmp_path / "nas").exists(), "a repository was made"
    # the controller's own file is held to the same
    records.records_path(controller.state_dir).write_text(damage)
    with pytest.raises(StepFailed, match="cannot be read"):
        jobs.open_repository(controller, "nas-primary", "pi-1", create=True)
    assert not (tmp_path / "nas").exists(), "a repository was made"


def test_deploy_keeps_the_records_a_worker_made_itself_and_never_makes_its_repository_again(
        controller: FleetContext, fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet from before workers got the controller's records: the edge worker made pi-1's repository and
    recorded it; this machine has no record. The first deploy after the upgrade finds the NAS volume unmounted:
    it adopts the worker's record and refuses the missing repository instead of making an empty one."""
    state = install_worker(controller, "nas-1", ["nas-primary"])
    install_worker(controller, "ops-1", ["offsite"])
    # what the old code left: the repository made on its first use, recorded in the worker's state only
    opened = jobs.open_repository(controller, "nas-primary", "pi-1", create=True)
    assert opened is not None and opened.created
    made = records.load(controller.state_dir)
    records.records_path(controller.state_dir).rename(records.records_path(state))
    (tmp_path / "nas" / "pi-1").rename(tmp_path / "pi-1.unmounted")  # the volume is not mounted

    report = DeployReport()
    problems = prepare_workers(controller, report)
    assert "record of repository nas-primary/pi-1 (kept by nas-1's worker)" in report.created, report
    assert len(problems) == 1 and problems[0].startswith("nas-primary/pi-1: ") and "is missing at" in problems[0]
    assert not (tmp_path / "nas" / "pi-1").exists(), "deploy made an empty repository in the missing one's place"
    assert records.load(controller.state_dir)["nas-primary/pi-1"] == made["nas-primary/pi-1"]
    assert records.load(state)["nas-primary/pi-1"] == made["nas-primary/pi-1"]


def test_deploy_gives_each_worker_the_mesh_plans_so_a_cross_site_sync_finds_its_destination(
        controller: FleetContext, fleet: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from primespark.data.layout import links
    from primespark.data.sync import address_of
    from primespark.mesh.plan import plan_mesh, save_state

    state = install_worker(controller, "nas-1", ["nas-primary"])
    install_worker(controller, "ops-1", ["offsite"])
    members = controller.fleet.mesh_members("fleet")
    plan = plan_mesh(controller.fleet, "fleet", {m: f"key-of-{m}" for m in members})
    save_state(controller.state_dir, plan.state())
    [link] = links(controller.fleet, "warm-to-cloud")  # nas-1 (edge) → analytics-1 (cloud), over the mesh
    worker = as_worker(fleet, "edge", state, monkeypatch)
    with pytest.raises(UserError, match="has no saved plan"):  # what the edge worker said before deploy gave it
        address_of(worker, link)

    monkeypatch.setenv("SPARK_STATE_DIR", str(controller.state_dir))
    report = DeployReport()
    prepare_workers(controller, report)
    assert {"mesh plan fleet of nas-1's worker", "mesh plan fleet of ops-1's worker"} <= set(report.created), report
    assert oct((state / "mesh" / "fleet.json").stat().st_mode & 0o777) == "0o600"
    assert address_of(as_worker(fleet, "edge", state, monkeypatch), link) == str(plan.state().address_of("analytics-1"))
    again = DeployReport()
    prepare_workers(controller, again)
    assert "mesh plan fleet of nas-1's worker" in again.unchanged and not again.changed, again
