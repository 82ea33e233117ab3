"""Field rules of the fleet model checked against what their consumers accept: restic's --read-data-subset,
Prefect's cron schedules, the secret store's paths, container image references, sane numeric bounds."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from primespark.fleet import FleetError, load_text
from primespark.fleet.model import Fleet

BASE = (Path(__file__).resolve().parent.parent / "fixtures" / "fleet" / "valid" / "mini-full.yaml").read_text()


def problems_after(old: str, new: str) -> list[tuple[str, str]]:
    """Load mini-full with one edit; the (dotted path, code) of each problem, [] if it loads."""
    assert BASE.count(old) == 1, f"{old!r} is not in mini-full.yaml once"
    try:
        load_text(BASE.replace(old, new), "edited.yaml")
    except FleetError as exc:
        return [(".".join(map(str, p.path)), p.code) for p in exc.problems]
    return []


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
    found = problems_after('password: "local:restic/nas-primary"', f'password: "{reference}"')
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
    assert {"Host.cpus", "Tier.capacity_gb", "Retention.keep_daily", "Targets.rpo_hours",
            "Service.port"} <= set(numbers), sorted(numbers)
    unbounded = []
    for where, field in numbers.items():
        if not any(getattr(m, "le", None) is not None or getattr(m, "lt", None) is not None
                   for m in field.metadata):
            unbounded.append(where)
    assert not unbounded, f"no upper bound: {unbounded}"
