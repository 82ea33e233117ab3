"""Lookup: what the Prefect server's host needs, from the fleet and the secret store on the controller (its
listen addresses, the API auth string, a PostgreSQL URL if the fleet names one). Tasks using it set no_log."""

from __future__ import annotations

from typing import Any

from primespark.ansible_plugins.controller_lookup import ControllerLookup

DOCUMENTATION = """
name: spark_prefect_server
short_description: the Prefect server's settings for one host
options:
  _terms:
    description: The inventory host name.
  env:
    description: The fleet environment.
    required: true
"""


class LookupModule(ControllerLookup):
    name = "spark_prefect_server"

    def find(self, term: str) -> Any:
        from primespark.orchestration.material import server_material

        return server_material(self.get_option("env"), term)
