"""`spark backup now HOST`: run the backup flow for one host now, here, and say what it did."""

from __future__ import annotations

import importlib
import os
import sys
import urllib.request
from typing import Annotated, Any

import typer
from rich.table import Table

from primespark.cli.common import console
from primespark.errors import UserError
from primespark.fleet import Fleet, load_fleet
from primespark.settings import get_settings

app = typer.Typer(help="Backups with restic: run one now (schedules run as Prefect deployments).",
                  no_args_is_help=True)

EnvOption = Annotated[str, typer.Option("--env", "-e", help="The environment (inventory/<env>.yaml) or a fleet file.")]
TransportOption = Annotated[str, typer.Option(help="ssh: restic runs on the hosts; local: on this machine.")]


def load_flow(module: str, name: str) -> Any:
    """The flows live in `flows/` at the checkout's root, beside src/ (Prefect deployments point there)."""
    root = str(get_settings().root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return getattr(importlib.import_module(f"flows.{module}"), name)


def use_lab_prefect(fleet: Fleet) -> None:
    """In the lab, runs go to the lab's Prefect server when it is up (so they show in its UI)."""
    if "PREFECT_API_URL" in os.environ or fleet.lab is None:
        return
    url = f"http://127.0.0.1:{fleet.lab.prefect_port}/api"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:  # noqa: S310 (loopback)
            if reply.status == 200:
                os.environ["PREFECT_API_URL"] = url
    except OSError:
        pass


def check_transport(transport: str) -> None:
    if transport not in ("ssh", "local"):
        raise UserError(f"unknown transport {transport!r}", "use --transport ssh (hosts) or local (this machine)")


def run_flow(flow: Any, *args: Any, **kwargs: Any) -> Any:
    from primespark.backup.orchestration import in_process_runs

    with in_process_runs():
        state = flow(*args, return_state=True, **kwargs)
    if not state.is_completed():
        raise UserError(str(state.result(raise_on_failure=False)), "see the run in the Prefect UI for each step")
    return state.result()


@app.command("now")
def now(
    host: Annotated[str | None, typer.Argument(help="A host with a backup plan; every such host if omitted.")] = None,
    env: EnvOption = "lab",
    transport: TransportOption = "ssh",
) -> None:
    """Back up HOST (or every host with a plan) now: the plan's paths into its repository, then the offsite copy."""
    check_transport(transport)
    fleet = load_fleet(env)
    plans = list(fleet.backup.plans) if fleet.backup else []
    if host is not None and host not in plans:
        raise UserError(f"{host!r} has no backup plan in {env}", f"back up one of: {', '.join(plans) or 'none'}")
    use_lab_prefect(fleet)
    flow = load_flow("backup", "backup")
    for name in [host] if host else plans:
        result = run_flow(flow, name, env, transport)
        table = Table(title=f"backup of {name}", show_header=False)
        for key, value in result.items():
            if key != "write_window":
                table.add_row(key, str(value))
        console.print(table)
