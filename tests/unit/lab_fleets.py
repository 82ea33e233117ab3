"""The lab fleet with another secret store, for tests without `spark lab up` (the lab's own OpenBao runs only
under it): a local store (its restic passwords as `local:` references), or a Vault the test started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def lab_fleet(tmp_path: Path, secrets: dict[str, Any], name: str = "lab.yaml") -> str:
    data = yaml.safe_load((ROOT / "inventory" / "lab.yaml").read_text())
    data["secrets"] = secrets
    if secrets["backend"] == "local":
        for repository_name, repository in data["backup"]["repositories"].items():
            repository["password"] = f"local:restic/{repository_name}"
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)
