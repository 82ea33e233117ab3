"""`alertmanager.yml` from the fleet: one route per (severity, receiver) of `monitoring.routes`, receivers from
`monitoring.receivers`. Secrets never enter the file: each is a `*_file` path under SECRETS_DIR, and the
deployment writes that file from the fleet's secret reference (`secret_files` says which goes where)."""

from __future__ import annotations

from typing import Any

from primespark.fleet.model import Fleet, Receiver, Severity
from primespark.monitoring.paths import SECRETS_DIR

NOWHERE = "nowhere"  # alerts no route sends anywhere: seen in Alertmanager's UI and `spark status` only
GROUP_BY = ["alertname", "host"]


def secret_files(fleet: Fleet) -> dict[str, str]:
    """File name under SECRETS_DIR → the secret reference whose value it holds."""
    out: dict[str, str] = {}
    for name, receiver in sorted(fleet.monitoring.receivers.items()):
        for field in ("bearer_token", "password", "api_url"):
            reference = getattr(receiver, field)
            if reference is not None:
                out[f"{name}.{field}"] = reference
    return out


def _secret(name: str, field: str) -> str:
    return f"{SECRETS_DIR}/{name}.{field}"


def _receiver(name: str, receiver: Receiver) -> dict[str, Any]:
    if receiver.kind == "webhook":
        hook: dict[str, Any] = {"url": receiver.url, "send_resolved": receiver.send_resolved}
        if receiver.bearer_token is not None:
            hook["http_config"] = {"authorization": {"type": "Bearer",
                                                     "credentials_file": _secret(name, "bearer_token")}}
        return {"name": name, "webhook_configs": [hook]}
    if receiver.kind == "email":
        mail: dict[str, Any] = {"to": receiver.to, "from": receiver.sender, "smarthost": receiver.smarthost,
                                "require_tls": receiver.require_tls, "send_resolved": receiver.send_resolved}
        if receiver.username is not None:
            mail["auth_username"] = receiver.username
        if receiver.password is not None:
            mail["auth_password_file"] = _secret(name, "password")
        return {"name": name, "email_configs": [mail]}
    slack: dict[str, Any] = {"api_url_file": _secret(name, "api_url"), "send_resolved": receiver.send_resolved,
                             "title": '{{ .CommonLabels.alertname }} ({{ .Status }})',
                             "text": '{{ range .Alerts }}{{ .Annotations.summary }}\n{{ end }}'}
    if receiver.channel is not None:
        slack["channel"] = receiver.channel
    return {"name": name, "slack_configs": [slack]}


def alertmanager_config(fleet: Fleet) -> dict[str, Any]:
    spec = fleet.monitoring
    routes = [{"receiver": receiver, "matchers": [f'severity="{severity.value}"'], "continue": True}
              for severity in Severity for receiver in spec.routes.get(severity, [])]
    route: dict[str, Any] = {"receiver": NOWHERE, "group_by": GROUP_BY, "group_wait": spec.group_wait,
                             "group_interval": spec.group_interval, "repeat_interval": spec.repeat_interval}
    if routes:
        route["routes"] = routes
    receivers = [{"name": NOWHERE}] + [_receiver(n, r) for n, r in sorted(spec.receivers.items())]
    # A host that is down explains its other alerts: while HostDown fires, its warnings wait.
    inhibit = [{"source_matchers": ['alertname="HostDown"'], "target_matchers": ['severity="warning"'],
                "equal": ["host"]}]
    return {"route": route, "receivers": receivers, "inhibit_rules": inhibit}


def receiver_secrets(env: str) -> dict[str, str]:
    """File name → value of every receiver secret, read from the environment's secret store (the monitoring_server
    role's lookup). A reference with nothing behind it is a SecretNotFound that names it."""
    from primespark.context import FleetContext
    from primespark.secrets import read_reference

    ctx = FleetContext.load(env)
    return {name: read_reference(reference, ctx.secrets) for name, reference in secret_files(ctx.fleet).items()}
