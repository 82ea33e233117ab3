"""Lookup: a host's sync key material from the fleet's secret store (the key made there on first use).

Runs on the controller, in the venv where primespark is installed; the result holds a private key, so tasks
using it set no_log.
"""

from __future__ import annotations

from typing import Any

from primespark.ansible_plugins.controller_lookup import ControllerLookup

DOCUMENTATION = """
name: spark_sync_material
short_description: a host's sync key, its destinations' host keys, and the public keys of the hosts that push to it
options:
  _terms:
    description: The inventory host name.
  env:
    description: The fleet environment.
    required: true
"""


class LookupModule(ControllerLookup):
    name = "spark_sync_material"

    def find(self, term: str) -> Any:
        from primespark.data.sync import host_material

        return host_material(self.get_option("env"), term)
