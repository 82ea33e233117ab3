"""A fleet for agent task tests on this machine: the agent-tasks fixture with its hot tier (pi-1, pi-2) in a folder
of the test's and the test's own templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "fleet" / "valid" / "agent-tasks.yaml"


def agent_fleet(root: Path, tasks: dict[str, Any] | None = None) -> str:
    data = yaml.safe_load(FIXTURE.read_text())
    data["tiers"]["hot"]["path"] = str(root / "hot")
    del data["backup"]  # its plans name /srv/hot, which is no tier folder here
    data["tasks"] = tasks or {}
    (root / "hot").mkdir(exist_ok=True)
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)
