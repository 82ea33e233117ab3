"""Lookup: a host's restic key material from the fleet's secret store (created there on first use).

Runs on the controller, in the venv where primespark is installed; the result holds private keys and
passwords, so tasks using it set no_log.
"""

from __future__ import annotations

from typing import Any

from primespark.ansible_plugins.controller_lookup import ControllerLookup

DOCUMENTATION = """
name: spark_backup_material
short_description: restic SFTP keys and repository passwords for one host
options:
  _terms:
    description: The inventory host name.
  env:
    description: The fleet environment.
    required: true
"""


class LookupModule(ControllerLookup):
    name = "spark_backup_material"

    def find(self, term: str) -> Any:
        from primespark.backup.repositories import host_material

        return host_material(self.get_option("env"), term)
