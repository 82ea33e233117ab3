"""Planning with its side effects: keys made for new hosts, removed hosts' keys dropped, the plan saved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from primespark.errors import UserError
from primespark.fleet.model import Fleet
from primespark.mesh.keys import MeshKeys
from primespark.mesh.plan import MeshPlan, MeshState, PlanDiff, diff_plans, load_state, plan_mesh, save_state
from primespark.secrets import SecretStore


@dataclass
class Planned:
    plan: MeshPlan
    keys: MeshKeys
    diff: PlanDiff
    previous: MeshState | None
    keys_created: list[str]
    preshared_created: int
    saved_to: Path | None


def plan_and_save(fleet: Fleet, mesh: str, state_dir: Path, store: SecretStore, *, save: bool = True) -> Planned:
    previous = load_state(state_dir, mesh)
    if previous is not None and previous.fleet != fleet.name:
        raise UserError(f"the saved plan of mesh {mesh} in {state_dir} belongs to fleet {previous.fleet}, "
                        f"not {fleet.name}", "give each environment its own state directory (SPARK_STATE_DIR)")
    if mesh not in fleet.meshes:
        raise UserError(f"fleet {fleet.name} has no mesh {mesh!r}",
                        f"use one of: {', '.join(fleet.meshes) or 'none (add a meshes: section)'}")
    keys = MeshKeys(store, mesh)
    members = fleet.mesh_members(mesh)
    public_keys: dict[str, str] = {}
    created: list[str] = []
    for host in members:
        public_keys[host], new = keys.ensure_host(host)
        if new:
            created.append(host)
    plan = plan_mesh(fleet, mesh, public_keys, previous)
    if previous is not None:
        for gone in set(previous.hosts) - set(members):
            keys.forget_host(gone)
    preshared = keys.sync_preshared_keys(plan.peer_pairs() if plan.spec.preshared_keys else [])
    diff = diff_plans(previous, plan)
    saved_to = None
    if save:
        keys.save()  # keys before the plan: a crash in between leaves keys the next run picks up
        saved_to = save_state(state_dir, plan.state())
    return Planned(plan, keys, diff, previous, created, preshared, saved_to)


def current_plan(fleet: Fleet, mesh: str, state_dir: Path, store: SecretStore) -> Planned:
    """The saved plan, refusing to act on it when the fleet has changed since it was made."""
    planned = plan_and_save(fleet, mesh, state_dir, store, save=False)
    if planned.previous is None:
        raise UserError(f"mesh {mesh} has no saved plan yet", f"run `spark mesh plan --env {fleet.name}` first")
    if not planned.diff.empty:
        changes = "; ".join(planned.diff.lines()[:5])
        raise UserError(f"the fleet changed since mesh {mesh} was planned ({changes})",
                        f"run `spark mesh plan --env {fleet.name}` and review the diff")
    return planned
