"""Ansible inventory plugin: the fleet model as an inventory.

Use a file named `<env>.fleet.yml` with `plugin: fleet` and `fleet: <env>.yaml` (relative to that file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin

DOCUMENTATION = r"""
name: fleet
short_description: Prime Spark fleet inventory
description:
  - Reads a Prime Spark fleet file through its typed model and exposes groups by site, site kind,
    host kind (pis, nas, kvm_hosts, vms) and service, with host variables derived from the model.
options:
  plugin:
    description: The name of this plugin.
    required: true
    choices: ['fleet']
  fleet:
    description: The fleet file, relative to this configuration file.
    required: true
    type: str
  env:
    description: The environment whose state directory holds SSH keys; defaults to the fleet's name.
    required: false
    type: str
"""


class InventoryModule(BaseInventoryPlugin):
    NAME = "fleet"

    def verify_file(self, path: str) -> bool:
        return super().verify_file(path) and path.endswith((".fleet.yml", ".fleet.yaml"))

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        from primespark.fleet import FleetError, load_fleet
        from primespark.inventory import build_inventory

        fleet_file = Path(path).parent / self.get_option("fleet")
        try:
            fleet = load_fleet(fleet_file)
        except FleetError as exc:
            raise AnsibleParserError(str(exc)) from None
        data = build_inventory(fleet, self.get_option("env") or fleet.name)
        for group, spec in data.items():
            if group in ("_meta", "all", "ungrouped"):
                continue
            self.inventory.add_group(group)
            for host in spec["hosts"]:
                self.inventory.add_host(host, group=group)
        for host, variables in data["_meta"]["hostvars"].items():
            for key, value in variables.items():
                self.inventory.set_variable(host, key, value)
