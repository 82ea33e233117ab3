"""`spark tls renew --env ENV --host HOST`: a host's certificate from the fleet CA, renewed when due (docs/tls.md)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import typer

from primespark.cli.common import console
from primespark.errors import UserError
from primespark.pki import HOST_TLS_FOLDER, context_vault

app = typer.Typer(help="The fleet's TLS: host certificates from the fleet CA (docs/tls.md).", no_args_is_help=True)


def fleet_client_context(env: str) -> ssl.SSLContext:
    """A TLS client context that trusts only the fleet CA of `env`, read from its Vault/OpenBao: how the controller
    verifies the fleet's endpoints (Prometheus, Alertmanager). Fails closed: no store, no CA, no connection."""
    from primespark.context import FleetContext
    from primespark.pki import client_context, fleet_ca_pem

    return client_context(fleet_ca_pem(FleetContext.load(env)))


@app.command("renew")
def renew(
    host: Annotated[str, typer.Option("--host", help="The host whose certificate this is (this machine).")],
    env: Annotated[str, typer.Option("--env", "-e", help="The environment (fleet) of the host.")] = "lab",
    folder: Annotated[Path, typer.Option("--dir", help="Where cert.pem, key.pem (0600) and ca.pem live.")]
    = HOST_TLS_FOLDER,
    textfile_dir: Annotated[Path | None, typer.Option(
        "--textfile-dir", help="Where node exporter reads metrics (default: the fleet's monitoring.textfile_dir, "
        "if it exists here).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Issue a new certificate even when not due.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say whether it is due; change nothing.")] = False,
) -> None:
    """Issue HOST's certificate when it has none, when two thirds of its life are over, or when it no longer names
    the host's addresses; else leave it. Asks for exactly the names, addresses and lifetime of the host's PKI role
    on the server. Writes the certificate's expiry metrics for node exporter, renewed or kept (not on a dry run).
    Meant for a timer on the host (not built yet): the exit status is 0 when the certificate is good."""
    from primespark.context import FleetContext
    from primespark.monitoring.metrics import certificate_metrics, textfile_path
    from primespark.pki import TlsFiles, served_plan
    from primespark.pki import renew as run_renewal

    ctx = FleetContext.load(env)
    if host not in ctx.fleet.hosts:
        raise UserError(f"fleet {ctx.fleet.name} has no host {host!r}", f"use one of: {', '.join(ctx.fleet.hosts)}")
    files = TlsFiles(folder)
    store = context_vault(ctx)
    client = store.client
    import hvac.exceptions
    import requests

    try:
        plan = served_plan(client, ctx.fleet.name, host)
        done = run_renewal(client, plan, host, files, force=force, dry_run=dry_run)
    except hvac.exceptions.Forbidden:
        raise UserError(f"Vault refused {host}'s certificate: this token's policies do not allow its PKI role",
                        f"log in with {host}'s TLS AppRole (primespark-{ctx.fleet.name}-tls.{host})") from None
    except hvac.exceptions.InvalidPath:
        raise UserError(f"the fleet CA has no PKI role for {host}",
                        f"apply the fleet: `spark up` (or `spark lab up --env {env}`)") from None
    except (hvac.exceptions.VaultDown, requests.exceptions.RequestException) as exc:  # down, sealed: one line
        raise store.unavailable(exc, "renewing", f"{host}'s certificate") from None
    verb = "renewed" if done.renewed else ("would renew" if dry_run and done.reason != "not due" else "kept")
    current = files.load()
    # no certificate there (a dry run before the first): nothing is valid yet, so no dates to give
    validity = "" if current is None else (f"; valid until {done.not_after:%Y-%m-%d %H:%M} UTC, due for renewal "
                                           f"from {done.renew_at:%Y-%m-%d %H:%M} UTC")
    console.print(f"{host}: {verb} ({done.reason}){validity}")
    metrics_dir = textfile_dir or Path(ctx.fleet.monitoring.textfile_dir)
    if current is not None and not dry_run and (textfile_dir is not None or metrics_dir.is_dir()):
        certificate_metrics(str(files.cert), current.not_valid_before_utc.timestamp(),
                            current.not_valid_after_utc.timestamp()).write(textfile_path(metrics_dir, "tls_" + host))
