"""`spark plan`: the Pulumi program under the mock engine, its resource graph and the policy verdicts."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from primespark.cloud.mockengine import PROJECT, Graph, run_program
from primespark.cloud.policyrun import Violation, run_policies
from primespark.errors import UserError
from primespark.fleet import Fleet, load_fleet
from primespark.fleet.loader import resolve
from primespark.fleet.model import SecretBackend
from primespark.secrets import LocalSecretStore
from primespark.settings import get_settings

FLEET_SKIP = frozenset({"kvm-capacity"})  # the policy pack reports it, on the resource graph


@dataclass
class PlanResult:
    stack: str
    fleet: Fleet
    graph: Graph
    violations: list[Violation]
    notes: list[str] = field(default_factory=list)

    @property
    def stack_urn(self) -> str:
        return stack_urn(self.stack)

    @property
    def mandatory(self) -> list[Violation]:
        return [v for v in self.violations if v.mandatory]


def stack_urn(stack: str) -> str:
    return f"urn:pulumi:{stack}::{PROJECT}::pulumi:pulumi:Stack::{PROJECT}-{stack}"


def stack_config(env: str) -> dict[str, str]:
    """`Pulumi.<env>.yaml`'s `primespark:` keys (without the prefix); {} for a fleet file given by path."""
    path = get_settings().root / f"Pulumi.{env}.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})", "fix the stack config file") from None
    config = data.get("config") or {}
    return {k.split(":", 1)[1]: str(v) for k, v in config.items() if k.startswith(f"{PROJECT}:")}


def _stack_name(env: str) -> str:
    candidate = Path(env)
    return candidate.stem if candidate.suffix in (".yaml", ".yml") or "/" in env else env


def _mesh_plans(fleet: Fleet, stack: str) -> tuple[dict[str, Any], list[str]]:
    """Plans for each mesh without saving anything: saved keys where the local store has them, else throwaway."""
    from primespark.mesh.service import plan_and_save

    settings = get_settings()
    state = settings.state_path(stack)
    plans, notes = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for mesh in fleet.meshes:
            # Plans stay offline: a fleet whose keys are in Vault is planned with throwaway keys.
            local = fleet.secrets.backend is SecretBackend.local and (state / "secrets").is_dir()
            store = LocalSecretStore(state / "secrets" if local else Path(scratch) / "secrets")
            planned = plan_and_save(fleet, mesh, state if local else Path(scratch), store, save=False)
            if planned.keys_created:
                notes.append(f"mesh {mesh}: {len(planned.keys_created)} host(s) without saved keys were planned with "
                             f"throwaway keys (`spark mesh plan --env {stack}` makes the real ones)")
            plans[mesh] = planned
    return plans, notes


def plan(env: str) -> PlanResult:
    from stacks.program import CloudConfig, build

    stack = _stack_name(env)
    config = stack_config(stack) if _stack_name(env) == env else {}
    fleet_ref = config.get("fleet", env)
    if _stack_name(env) != env:
        fleet_ref = str(resolve(env))
    fleet = load_fleet(fleet_ref, skip=FLEET_SKIP)
    cloud = CloudConfig(
        fleet=fleet_ref,
        vault_address=config.get("vaultAddress") or fleet.secrets.address or f"https://vault.{fleet.domain}:8200",
        vault_mount=config.get("vaultMount", "secret"),
        public_bridge=config.get("publicBridge", "br0"),
        pool_path=config.get("poolPath", CloudConfig.pool_path),
        image_cache=config.get("imageCache", ""),
        libvirt_uri=config.get("libvirtUri", ""),
        manage_vault=config.get("manageVault", "true").lower() != "false",
    )
    mesh_plans, notes = _mesh_plans(fleet, stack)
    graph = run_program(lambda: build(fleet, cloud, mesh_plans), stack, config)
    for name, image in fleet.images.items():
        if set(image.sha256) == {"0"}:
            notes.append(f"image {name}: the sha256 is a placeholder; `spark up` refuses the download until you pin "
                         "the real checksum in the fleet")
    return PlanResult(stack, fleet, graph, run_policies(graph, stack_urn(stack)), notes)
