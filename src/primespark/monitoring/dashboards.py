"""Grafana dashboards as code, from the fleet, with grafana-foundation-sdk (typed builders for Grafana 11.3, the
version the compose stack runs; grafanalib never got the time-series panel and emits Angular panels that
Grafana 11 no longer draws). Only React panels: time series and stat.

Every alert of the fleet (primespark.monitoring.alerts) gets a panel that plots its signal, on the dashboard the
alert names; the panel's description says which alerts it shows. Panels whose metric no one writes yet
(alerts.PANEL_NOT_YET) are not drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
)

from primespark.fleet.model import Fleet
from primespark.monitoring import metrics as m
from primespark.monitoring.alerts import (
    AGENTS,
    BACKUPS,
    EXPORT_STALE_SECONDS,
    MESH,
    NODES,
    OVERVIEW,
    PANEL_NOT_YET,
    SYNC,
    Alert,
    fleet_alerts,
    sync_limits,
)
from primespark.monitoring.files import DATASOURCE_UID
from primespark.monitoring.promql import selector
from primespark.monitoring.scrape import NODE_JOB

DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
TITLES = {OVERVIEW: "Fleet overview", MESH: "Mesh", BACKUPS: "Backups and drills", NODES: "Nodes", SYNC: "Sync",
          AGENTS: "Agent tasks and work pools"}
REACT_PANELS = frozenset({"timeseries", "stat", "row"})  # what this module draws; none of them Angular


@dataclass
class PanelSpec:
    """One panel: its queries (expr, legend), its kind, and the alerts whose signal it shows."""

    title: str
    queries: list[tuple[str, str]]
    kind: str = "timeseries"
    unit: str = "none"
    threshold: float | None = None
    alerts: list[str] = field(default_factory=list)
    up_down: bool = False  # 1/0 shown as up/down (or ok/failed)
    description: str = ""


def _signal_panels(alerts: list[Alert], board: str) -> list[PanelSpec]:
    """One panel per distinct signal of the board's alerts (the three filesystem alerts share one)."""
    panels: dict[str, PanelSpec] = {}
    for alert in (a for a in alerts if a.dashboard == board and a.name not in PANEL_NOT_YET):
        spec = panels.get(alert.signal)
        if spec is None:
            binary = alert.signal.startswith(("up", m.BACKUP_SUCCESS.name, m.DRILL_SUCCESS.name,
                                              m.CHECK_SUCCESS.name, m.MESH_PAIR_UP.name, m.SYNC_SUCCESS.name,
                                              m.WORK_POOL_READY.name, "spark_power_"))
            spec = PanelSpec(_signal_title(alert), [(alert.signal, _legend(alert.signal))],
                             kind="stat" if binary else "timeseries", unit=alert.unit, threshold=alert.threshold,
                             up_down=binary)
            panels[alert.signal] = spec
        elif alert.threshold is not None and (spec.threshold is None or alert.threshold > spec.threshold):
            spec.threshold = alert.threshold
        spec.alerts.append(alert.name)
    return list(panels.values())


_SIGNAL_TITLES = {
    "HostDown": "Hosts up", "MonitoringTargetDown": "Monitoring services up", "BackupFailed": "Last backup",
    "BackupTooOld": "Newest snapshot age (RPO)", "DrillFailed": "Last DR drill", "DrillOverdue": "Time since drill",
    "ResticCheckFailed": "restic check", "ResticCheckOverdue": "Time since check", "MeshPairDown": "Pairs reachable",
    "MeshHandshakeStale": "Handshake age", "FilesystemFillingUp": "Filesystem free space", "ClockSkew": "Clock offset",
    "TierAboveHighWatermark": "Tier fill", "UpsOnBattery": "On battery", "UpsBatteryLow": "Battery low",
    "CertificateExpiry": "Certificate life left", "SyncRefused": "Last pass", "SyncLagHigh": "Lag of the last pass",
    "WorkerPoolNotReady": "Work pools ready", "AgentTaskFailures": "Agent tasks failed or crashed (last hour)",
}


def _signal_title(alert: Alert) -> str:
    return _SIGNAL_TITLES.get(alert.name, alert.name)


def _legend(expr: str) -> str:
    if expr.startswith(("primespark_work_pool_", "primespark_agent_task_")):
        return "{{template}}" if "agent_task" in expr else "{{pool}}"
    if expr.startswith(("primespark_sync_", "primespark:sync_")):
        return "{{sync_job}}/{{source}}"
    if expr.startswith(m.MESH_PAIR_UP.name) or expr.startswith(m.MESH_HANDSHAKE_AGE.name):
        return "{{source}} → {{target}}"
    if expr.startswith(m.CHECK_SUCCESS.name):
        return "{{repository}}/{{client}}"
    if expr.startswith(m.CHECK_AGE.name):
        return "{{repository}}"
    if expr.startswith(m.FS_FREE.name):
        return "{{host}} {{mountpoint}}"
    if expr.startswith(m.STORAGE_USAGE.name):
        return "{{host}} {{name}}"
    if expr.startswith(m.UP.name) and "!=" in expr:
        return "{{job}} on {{host}}"
    return "{{host}}"


def _extra_panels(fleet: Fleet, board: str) -> list[PanelSpec]:
    """Context beside the alerts' signals."""
    if board == OVERVIEW:
        overview = [PanelSpec("Alerts firing", [('count(ALERTS{alertstate="firing"}) or vector(0)', "firing")],
                              kind="stat", threshold=1)]
        if fleet.backup is not None:
            overview.append(PanelSpec("Newest snapshot age", [(selector(m.BACKUP_AGE), "{{host}}")], kind="stat",
                                      unit="s", threshold=fleet.backup.targets.rpo_hours * 3600))
        if fleet.meshes:
            overview.append(PanelSpec("Mesh pairs not reachable",
                                      [(f"count({selector(m.MESH_PAIR_UP)} == 0) or vector(0)", "pairs down")],
                                      kind="stat", threshold=1))
        if fleet.sync is not None:
            overview.append(PanelSpec("Sync links failing",
                                      [(f"count({selector(m.SYNC_SUCCESS)} == 0) or vector(0)", "links")],
                                      kind="stat", threshold=1))
        if fleet.orchestration is not None:
            overview.append(PanelSpec("Agent tasks running",
                                      [(f"sum({selector(m.AGENT_TASK_RUNNING)}) or vector(0)", "running")],
                                      kind="stat"))
            overview.append(PanelSpec("Agent tasks failed (last hour)",
                                      [(f"sum({selector(m.AGENT_TASK_FAILED)}) or vector(0)", "failed")],
                                      kind="stat", threshold=1))
        if fleet.tiers:
            overview.append(PanelSpec("Tier fill", [(selector(m.STORAGE_USAGE, name=("=~", "tier-.*")),
                                                     "{{host}} {{name}}")], kind="stat", unit="percentunit",
                                      threshold=min(t.high_watermark for t in fleet.tiers.values())))
        return overview
    if board == BACKUPS and fleet.backup is not None:
        targets = fleet.backup.targets
        return [
            PanelSpec("Backup duration", [(selector(m.BACKUP_DURATION), "{{host}}")], unit="s"),
            PanelSpec("Snapshot size", [(selector(m.BACKUP_SIZE), "{{host}}")], unit="bytes"),
            PanelSpec("Added by the last backup", [(selector(m.BACKUP_ADDED), "{{host}}")], unit="bytes"),
            PanelSpec("Drill RTO", [(selector(m.DRILL_RTO), "{{host}}")], unit="s",
                      threshold=targets.rto_minutes * 60),
            PanelSpec("Drill RPO", [(selector(m.DRILL_RPO), "{{host}}")], unit="s", threshold=targets.rpo_hours * 3600),
        ]
    if board == SYNC and fleet.sync is not None:
        ages = [x.age for x in sync_limits(fleet) if x.age is not None]
        links = "{{sync_job}}/{{source}}"
        return [
            # scheduled links: SyncLagHigh reads this one
            PanelSpec("Time since last successful pass", [(selector(m.SYNC_SUCCESS_AGE), links)], unit="s",
                      threshold=min(ages, default=None), alerts=["SyncLagHigh"] if ages else []),
            PanelSpec("Sent by the last pass", [(selector(m.SYNC_SENT_BYTES), links)], unit="bytes"),
            PanelSpec("Passes failed and refused", [(selector(m.SYNC_ERRORS), f"failed {links}"),
                                                    (selector(m.SYNC_REFUSALS), f"refused {links}")]),
        ]
    if board == AGENTS and fleet.orchestration is not None:
        return [
            PanelSpec("Workers online", [(selector(m.WORK_POOL_WORKERS), "{{pool}}")], kind="stat"),
            PanelSpec("Agent tasks running", [(selector(m.AGENT_TASK_RUNNING), "{{template}}")]),
            # the export's own age: old figures above are from an export that stopped (WorkerPoolNotReady no-data)
            PanelSpec("Age of the Prefect export", [(f"time() - {selector(m.PREFECT_EXPORT_TIME)}", "{{host}}")],
                      kind="stat", unit="s", threshold=EXPORT_STALE_SECONDS, alerts=["WorkerPoolNotReady"]),
        ]
    if board == MESH:
        return [PanelSpec("Round trip over the overlay", [(selector(m.MESH_PAIR_RTT), "{{source}} → {{target}}")],
                          unit="s")]
    if board == NODES:
        cpu = selector(m.NODE_CPU, job=NODE_JOB, mode="idle")
        return [
            PanelSpec("CPU busy", [(f"1 - avg by (host) (rate({cpu}[5m]))", "{{host}}")], unit="percentunit"),
            PanelSpec("Memory available", [(f"{selector(m.NODE_MEM_AVAILABLE, job=NODE_JOB)} / "
                                            f"{selector(m.NODE_MEM_TOTAL, job=NODE_JOB)}", "{{host}}")],
                      unit="percentunit"),
            PanelSpec("Load (1 min)", [(selector(m.NODE_LOAD1, job=NODE_JOB), "{{host}}")]),
            PanelSpec("Network received",
                      [(f"sum by (host) (rate({selector(m.NODE_NET_RECEIVE, job=NODE_JOB, device=('!=', 'lo'))}[5m]))",
                        "{{host}}")], unit="Bps"),
            PanelSpec("Uptime", [(f"time() - {selector(m.NODE_BOOT_TIME, job=NODE_JOB)}", "{{host}}")],
                      kind="stat", unit="s"),
        ]
    return []


def panel_specs(fleet: Fleet) -> dict[str, list[PanelSpec]]:
    alerts = fleet_alerts(fleet)
    boards = {board: _signal_panels(alerts, board) + _extra_panels(fleet, board) for board in TITLES}
    for panels in boards.values():
        for spec in panels:
            shows = f"Shows the signal of: {', '.join(spec.alerts)}." if spec.alerts else ""
            spec.description = " ".join(x for x in (shows, spec.description) if x)
    return {b: p for b, p in boards.items() if p}


def _thresholds(value: float | None) -> dash.ThresholdsConfig:
    steps = [Threshold(value=None, color="green")]
    if value is not None:
        steps.append(Threshold(value=value, color="red"))
    return dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps)


def _states(expr: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(text, colour) for 1 and for 0 of a yes/no signal."""
    if expr.startswith(m.UP.name):
        return ("UP", "green"), ("DOWN", "red")
    if expr.startswith(m.WORK_POOL_READY.name):
        return ("READY", "green"), ("NOT READY", "red")
    if expr.startswith(m.POWER_ON_BATTERY.name) or expr.startswith(m.POWER_BATTERY_LOW.name):
        return ("YES", "red"), ("no", "green")
    return ("OK", "green"), ("FAILED", "red")


def _panel(spec: PanelSpec) -> Any:
    targets = [prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
               for i, (expr, legend) in enumerate(spec.queries)]
    if spec.kind == "stat":
        panel: Any = (stat.Panel().reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
                      .color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.NONE)
                      .text_mode(common.BigValueTextMode.VALUE_AND_NAME).thresholds(_thresholds(spec.threshold)))
        if spec.up_down:
            (one, one_colour), (zero, zero_colour) = _states(spec.queries[0][0])
            panel = panel.mappings([ValueMap({"1": ValueMappingResult(text=one, color=one_colour),
                                              "0": ValueMappingResult(text=zero, color=zero_colour)})])
    else:
        panel = timeseries.Panel().thresholds(_thresholds(spec.threshold)).line_width(1).fill_opacity(10)
        if spec.threshold is not None:
            panel = panel.thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.LINE))
    panel = panel.title(spec.title).description(spec.description).datasource(DATASOURCE).unit(spec.unit)
    for target in targets:
        panel = panel.with_target(target)
    return panel.height(8).span(12)


def _board(fleet: Fleet, uid: str, panels: list[PanelSpec]) -> dict[str, Any]:
    builder = (dash.Dashboard(f"{TITLES[uid]} · {fleet.name}").uid(f"primespark-{fleet.name}-{uid}")
               .tags(["primespark", fleet.name]).refresh("1m").time("now-24h", "now").timezone("browser")
               .tooltip(DashboardCursorSync.CROSSHAIR).editable())
    for spec in panels:
        builder = builder.with_panel(_panel(spec))
    board: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder, sort_keys=True))
    return board


def dashboards(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """Dashboard key (overview, mesh, backups, nodes, sync, agents) → the dashboard's JSON model; only those with
    panels."""
    return {uid: _board(fleet, uid, panels) for uid, panels in panel_specs(fleet).items()}


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of a dashboard's JSON model."""
    return [(p.get("title", ""), t["expr"]) for p in board.get("panels", []) for t in p.get("targets", [])]
