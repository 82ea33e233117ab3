"""`probe`: where a site's flows run, and what they reach: the worker's host and Python, and for each host of the
site whether it answers over SSH as the fleet user with sudo (the worker's own key). Deployed unscheduled as
`probe-<site>` on each pool: run it from the UI (or `spark flows probe`) to check a worker end to end."""

from __future__ import annotations

import platform
import socket
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from primespark.context import FleetContext, Transport
from primespark.errors import StepFailed
from primespark.hosts import on_each, shell
from primespark.orchestration import auditing
from primespark.orchestration.auditing import audited
from primespark.orchestration.placement import site_hosts


@flow(name="probe", flow_run_name="probe-{site}", log_prints=True)
@audited(auditing.site)
def probe(site: str, env: str = "lab", transport: Transport = "ssh", reach: bool = True) -> dict[str, Any]:
    """`reach`: also log in to each host of the site (`sudo -n true`); without it, only say where it runs."""
    ctx = FleetContext.load(env, transport)
    if site not in ctx.fleet.sites:
        raise ValueError(f"no site {site!r} in the fleet {ctx.fleet.name!r}")

    def answers(host: str) -> str:
        try:
            shell(ctx.hosts.runner(host), "sudo -n true", timeout=30)
        except StepFailed as exc:
            return f"no: {exc.message}"
        return "yes"

    reached = on_each(site_hosts(ctx.fleet, site), answers) if reach else {}
    result = {"site": site, "runs_on": socket.gethostname(), "python": platform.python_version(),
              "reached": reached}
    lines = [f"- `{host}`: {said}" for host, said in reached.items()]
    create_markdown_artifact(f"# Probe of {site}\n\nruns on `{result['runs_on']}`\n\n" + "\n".join(lines),
                             key=f"probe-{site}", description=f"what the {site} worker reaches")
    unreachable = [h for h, said in reached.items() if said != "yes"]
    if unreachable:
        raise RuntimeError(f"the {site} worker cannot reach: {', '.join(unreachable)}")
    return result
