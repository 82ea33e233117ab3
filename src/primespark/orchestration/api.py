"""Pointing this process at the fleet's Prefect server: its address as the controller reaches it (the server's LAN
address, or PREFECT_API_URL when the operator set one, e.g. a tunnel) and the API's auth string from the secret
store. A server that does not answer, or refuses the auth string, is one clear line naming the address tried."""

from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request

from primespark.context import FleetContext
from primespark.errors import UserError

HEALTH_TIMEOUT = 5.0


def fleet_api(ctx: FleetContext) -> tuple[str, str]:
    """(API URL, auth string) of the fleet's server."""
    from primespark.orchestration.material import api_url, auth_string

    return ctx.settings.prefect_api_url or api_url(ctx), auth_string(ctx)


def check(url: str, auth: str | None, timeout: float = HEALTH_TIMEOUT) -> None:
    """The server answers and takes the auth string, or a UserError saying which address did not."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as reply:  # noqa: S310 (the fleet's server)
            reply.read()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"the Prefect server at {url} does not answer ({reason})",
                        "start it (site.yml's prefect_server play; `spark lab up` + site.yml in the lab) or fix "
                        "PREFECT_API_URL") from None
    if auth is None:
        return
    request = urllib.request.Request(f"{url}/admin/version",  # noqa: S310
                                     headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
            reply.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UserError(f"the Prefect server at {url} refused the API auth string (401)",
                            "the server and the secret store disagree: apply site.yml's prefect_server play "
                            "again") from None
        raise UserError(f"the Prefect server at {url} answered {exc.code} to /admin/version",
                        "see the server's log") from None
    except OSError as exc:
        raise UserError(f"the Prefect server at {url} does not answer ({getattr(exc, 'reason', exc)})",
                        "start it, or fix PREFECT_API_URL") from None


def use_fleet_prefect(ctx: FleetContext) -> str:
    """Point this process's Prefect client at the fleet's server (checked first); the URL used."""
    url, auth = fleet_api(ctx)
    check(url, auth)
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
