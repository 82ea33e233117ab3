"""Field rules of the fleet model checked against what their consumers accept: restic's --read-data-subset,
Prefect's cron schedules, the secret store's paths, container image references, sane numeric bounds."""

from __future__ import annotations

import os
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from primespark.fleet import FleetError, load_text
from primespark.fleet.model import Backup, Fleet

BASE = (Path(__file__).resolve().parent.parent / "fixtures" / "fleet" / "valid" / "mini-full.yaml").read_text()


def problems_after(old: str, new: str, append: str = "") -> list[tuple[str, str]]:
    """Load mini-full with one edit (and `append` at its end); the (dotted path, code) of each problem, [] if it
    loads."""
    assert BASE.count(old) == 1, f"{old!r} is not in mini-full.yaml once"
    try:
        load_text(BASE.replace(old, new) + append, "edited.yaml")
    except FleetError as exc:
        return [(".".join(map(str, p.path)), p.code) for p in exc.problems]
    return []


def subset_problems(value: str) -> list[tuple[str, str]]:
    return problems_after("  targets: {rpo_hours: 26", f'  check: {{read_data_subset: "{value}"}}\n'
                          "  targets: {rpo_hours: 26")


# restic 0.14 (Debian 12's, the one the project installs) decides each of these; the fleet must agree.
SUBSETS = ["5%", "100%", "100.0%", "0.5%", "2.5%", "0%", "100.1%", "900%", "1/2", "3/3", "1/256", "0/2", "2/1",
           "1/257", "1G", "1g", "1K", "1T", "1B", "1", "0", "1P", "1.5G", "-1G", "abc", "1/2/3", "5%%", " 5%",
           "8388607T", "8388608T"]


@pytest.fixture(scope="module")
def restic_repository(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("restic") is None:
        pytest.skip("restic is not installed (make apt installs it)")
    root = tmp_path_factory.mktemp("subset")
    env = {**os.environ, "RESTIC_REPOSITORY": str(root / "repo"), "RESTIC_PASSWORD": "test-only",
           "RESTIC_CACHE_DIR": str(root / "cache")}
    (root / "data").mkdir()
    (root / "data" / "file").write_text("some data\n")
    subprocess.run(["restic", "init"], env=env, check=True, capture_output=True, timeout=60)
    subprocess.run(["restic", "backup", str(root / "data")], env=env, check=True, capture_output=True, timeout=60)
    return env


@pytest.mark.parametrize("value", SUBSETS)
def test_read_data_subset_is_accepted_exactly_when_restic_accepts_it(
    value: str, restic_repository: dict[str, str]
) -> None:
    done = subprocess.run(["restic", "check", f"--read-data-subset={value}"], env=restic_repository,
                          capture_output=True, text=True, timeout=60)
    refused = subset_problems(value)
    assert not refused or refused == [("backup.check.read_data_subset", "read-data-subset")]
    assert (done.returncode == 0) == (not refused), f"restic: {done.returncode} {done.stderr.strip()}"


@pytest.mark.parametrize("value", ["1e2%", "+5%", "10000000000T"])
def test_read_data_subset_refuses_restics_odd_forms(value: str) -> None:
    # restic 0.14 takes these (Go's float syntax; a size that overflows to a small one); the fleet keeps to the
    # plain decimal forms and to sizes below 8 EiB.
    assert subset_problems(value) == [("backup.check.read_data_subset", "read-data-subset")]


@pytest.mark.parametrize(("schedule", "accepted"), [
    ("99 99 99 99 99", False), ("60 * * * *", False), ("0 24 * * *", False), ("0 0 0 * *", False),
    ("0 0 * 13 *", False), ("0 0 * * 8", False), ("*/0 * * * *", False), ("H 2 * * *", False),
    ("0 2 * * *", True), ("*/15 * * * *", True), ("0 2 * * mon-fri", True), ("0 0 1,15 jan *", True),
    ("0 0 * * 7", True), ("0 2 L * *", True),
    ("@daily", False), ("0 2 * * * 5", False),  # Prefect takes these; the fleet keeps to five fields
])
def test_cron_schedules_are_what_prefect_accepts(schedule: str, accepted: bool) -> None:
    found = problems_after('schedule: "30 1 * * *"', f'schedule: "{schedule}"')
    assert (not found) == accepted, found
    if not accepted:
        [(path, _)] = found
        assert path == "backup.plans.nas-1.schedule"


CRON_CORPUS = ["99 99 99 99 99", "60 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "0 0 * * 8", "*/0 * * * *",
               "H 2 * * *", "R 2 * * *", "0 2 * * *", "*/15 * * * *", "0 2 * * mon-fri", "0 0 1,15 jan *",
               "0 0 * * 7", "0 2 L * *", "5-10/2 * * * *", "0 0 29 2 *", "0 0 * * sun#2", "0 0 * * 5L", "a b c d e",
               "0 0 ? * *", "1-60 * * * *", "0 0 * jan-dec/3 *", "0 0 1W * *", "* * * * 7-1", "0 0 LW * *",
               "0 0 15W * *"]


@pytest.mark.parametrize("schedule", CRON_CORPUS)
def test_the_fleets_cron_check_agrees_with_prefects(schedule: str) -> None:
    """The fleet checks cron with the standalone croniter (milliseconds) rather than Prefect's (seconds to
    import): both must judge every expression alike, or a deployment would refuse what validate took."""
    from prefect.schedules import Cron

    from primespark.fleet.model import cron_accepted

    try:
        Cron(schedule)
        prefect = True
    except ValueError:
        prefect = False
    assert cron_accepted(schedule) == prefect


@pytest.mark.parametrize(("reference", "accepted"), [
    ("local:restic/nas-primary", True), ("local:nas_primary.key", True),
    ("vault:secret/primespark/restic#nas-primary", True), ("vault:kv/restic#key_1", True),
    ("local:../../etc/shadow", False), ("local:restic/../../x", False), ("local:/etc/shadow", False),
    ("local:restic//x", False), ("local:restic/", False), ("local:./restic", False), ("local:restic/.hidden", False),
    ("local:restic#key", False), ("vault:secret#key", False), ("vault:secret/restic", False),
    ("vault:secret/restic#", False), ("vault:secret/restic#a#b", False), ("vault:/secret/restic#key", False),
    ("vault:secret/../restic#key", False),
])
def test_secret_references_stay_inside_their_store(reference: str, accepted: bool) -> None:
    vault = 'secrets: {backend: vault, address: "https://vault.example.org:8200"}\n'
    found = problems_after('password: "local:restic/nas-primary"', f'password: "{reference}"',
                           vault if reference.startswith("vault:") else "")
    assert found == ([] if accepted else [("backup.repositories.nas-primary.password", "secret-reference")])


@pytest.mark.parametrize(("image", "accepted"), [
    ("redis:7.4.1", True), ("registry.example.org:5000/team/redis:7.4.1-alpine", True),
    ("redis@sha256:" + "a" * 64, True), ("redis:7.4@sha256:" + "b" * 64, True),
    ("redis", False), ("redis:latest", False), ("Redis:7", False), ("redis:7 ", False), ("redis::7", False),
    ("https://registry.example.org/redis:7", False),
])
def test_a_named_image_is_a_pinned_reference(image: str, accepted: bool) -> None:
    found = problems_after("redis: {kind: redis, host: core-1, port: 6379}",
                           f'redis: {{kind: redis, host: core-1, port: 6379, image: "{image}"}}')
    assert found == ([] if accepted else [("services.redis.image", "image-reference")])


def test_an_api_service_must_name_its_image() -> None:
    unnamed = problems_after(', image: "registry.example.org/primespark/api:0.1.0"}', "}")
    assert unnamed == [("services.api.image", "missing-image")]


def test_a_host_holds_one_tier() -> None:
    found = problems_after("cold: {hosts: [ops-1]", "cold: {hosts: [ops-1, pi-1]")
    assert found == [("tiers.cold.hosts.1", "host-in-two-tiers")]


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1.0e+400", ".inf", ".nan", "nan"])
def test_targets_are_finite(number: str) -> None:
    found = problems_after("rpo_hours: 26", f"rpo_hours: {number}")
    assert [path for path, _ in found] == ["backup.targets.rpo_hours"]


def _numeric_fields(model: type[BaseModel], seen: set[type[BaseModel]]) -> typing.Iterator[tuple[str, object]]:
    if model in seen:
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        where = f"{model.__name__}.{name}"
        todo = [field.annotation]
        while todo:
            kind = todo.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _numeric_fields(kind, seen)
            elif kind in (int, float):
                yield where, field
            else:
                todo.extend(typing.get_args(kind))


def test_every_number_in_the_fleet_has_an_upper_bound() -> None:
    numbers = dict(_numeric_fields(Fleet, set()))
    assert {"Host.cpus", "Tier.capacity_gb", "Retention.keep_daily", "Targets.rpo_hours", "Backup.max_shrink",
            "Service.port"} <= set(numbers), sorted(numbers)
    unbounded = []
    for where, field in numbers.items():
        if not any(getattr(m, "le", None) is not None or getattr(m, "lt", None) is not None
                   for m in field.metadata):
            unbounded.append(where)
    assert not unbounded, f"no upper bound: {unbounded}"


def test_max_shrink_is_a_fraction_with_a_default_of_one_half() -> None:
    assert Backup.model_fields["max_shrink"].default == 0.5
    for value, accepted in (("0", False), ("1.5", False), ("-0.1", False), ("1", True), ("0.2", True)):
        found = problems_after("  drill: {scratch_host: pi-2}",
                               f"  drill: {{scratch_host: pi-2}}\n  max_shrink: {value}")
        assert (not found) == accepted, (value, found)


def test_a_sync_jobs_fsync_takes_yamls_bare_off_and_the_earlier_booleans() -> None:
    import yaml

    from primespark.fleet.model import FsyncMode, SyncJob

    job = "source: 'pi-1:/srv/hot'\ndestination: 'nas-1:/srv/warm/{host}'\n"
    assert SyncJob.model_validate(yaml.safe_load(job)).fsync is FsyncMode.pass_
    for written, mode in (("off", "off"), ("false", "off"), ("true", "file"), ("pass", "pass"), ("file", "file")):
        assert SyncJob.model_validate(yaml.safe_load(f"{job}fsync: {written}\n")).fsync == mode, written
