"""Pointing this process at the fleet's Prefect server: its address as the controller reaches it (the server's LAN
address, or PREFECT_API_URL when the operator set one, e.g. a tunnel), the fleet CA its TLS is verified against,
and the API's auth string from the secret store. A server that does not answer, or refuses the auth string, is one
clear line naming the address tried."""

from __future__ import annotations

import base64
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from primespark.context import FleetContext
from primespark.errors import UserError

HEALTH_TIMEOUT = 5.0


def server_url(ctx: FleetContext) -> tuple[str, str]:
    """The fleet's server as this machine reaches it, and where that address came from."""
    from primespark.orchestration.material import api_url

    if ctx.settings.prefect_api_url:
        return ctx.settings.prefect_api_url.rstrip("/"), "PREFECT_API_URL in the environment"
    return api_url(ctx), "the fleet's orchestration.server"


def api_context(url: str) -> ssl.SSLContext | None:
    """How this process verifies the Prefect API at `url`, as Prefect's own client does: over https, against the CA
    file PREFECT_API_SSL_CERT_FILE names (the fleet CA: a worker's env file, or use_fleet_prefect) only, else the
    system's CAs; plain http: nothing to verify."""
    if not url.startswith("https:"):
        return None
    cafile = os.environ.get("PREFECT_API_SSL_CERT_FILE", "").strip()
    if not cafile and "prefect.settings" in sys.modules:  # a Prefect profile or temporary_settings say it
        from prefect.settings import PREFECT_API_SSL_CERT_FILE

        cafile = (PREFECT_API_SSL_CERT_FILE.value() or "").strip()
    if not cafile:
        return ssl.create_default_context()
    from primespark.pki import client_context

    try:
        return client_context(Path(cafile).read_text())
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot read the CA that verifies the Prefect API ({cafile}, PREFECT_API_SSL_CERT_FILE): "
                        f"{getattr(exc, 'strerror', None) or exc}",
                        "on a host the tls role puts it there (site.yml); or fix PREFECT_API_SSL_CERT_FILE") from None


def check_health(url: str, source: str, fix: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """The server at `url` answers /health, or one UserError naming the address, where it came from, and how to
    start it (not forty lines of connection traceback from inside the first run)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout,  # noqa: S310 (the fleet's server)
                                    context=api_context(url)) as reply:
            reply.read()
            return
    except urllib.error.HTTPError as exc:
        problem = f"it answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", None) or exc)
    raise UserError(f"the Prefect server at {url} (from {source}) is unreachable: {problem}", fix)


def check_auth(url: str, auth: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """The server takes the API auth string, or a UserError saying it refused it."""
    request = urllib.request.Request(f"{url}/admin/version",  # noqa: S310
                                     headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=api_context(url)) as reply:  # noqa: S310
            reply.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UserError(f"the Prefect server at {url} refused the API auth string (401)",
                            "the server and the secret store disagree: apply site.yml's prefect_server play "
                            "again") from None
        raise UserError(f"the Prefect server at {url} answered {exc.code} to /admin/version",
                        "see the server's log") from None
    except OSError as exc:
        raise UserError(f"the Prefect server at {url} is unreachable: {getattr(exc, 'reason', exc)}",
                        "start it, or fix PREFECT_API_URL") from None


def use_fleet_prefect(ctx: FleetContext) -> str:
    """Point this process's Prefect client at the fleet's server (checked first: reachable, then the auth string,
    which is read from the secret store only once the server answers); the URL used."""
    from primespark.orchestration.material import auth_string

    url, source = server_url(ctx)
    if url.startswith("https:") and not os.environ.get("PREFECT_API_SSL_CERT_FILE"):
        from primespark.pki import fleet_ca_file

        # Prefect's client (HTTP and websockets) trusts this file only; a worker's env file names the host's copy
        os.environ["PREFECT_API_SSL_CERT_FILE"] = str(fleet_ca_file(ctx))
    lab = f"`spark lab up --env {ctx.env}` and site.yml start the lab's" if ctx.fleet.lab is not None else "start it"
    check_health(url, source, f"{lab} (site.yml's prefect_server play), or fix PREFECT_API_URL")
    auth = auth_string(ctx)
    check_auth(url, auth)
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_API_AUTH_STRING"] = auth
    refresh_prefect_settings()
    return url


def refresh_prefect_settings() -> None:
    """Prefect reads its settings from the environment once, when it is imported: an import before the change
    (a flow module) would otherwise keep talking to a temporary local API."""
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
