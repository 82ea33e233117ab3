"""Lookups on the controller: `spark_prefect_worker` is everything a site's worker holds (its SSH key, its site's
repository passwords, the API's address and auth string); `spark_prefect_worker_keys` the worker keys one host
authorises. Made in the secret store on first use. The first holds private material: tasks using it set no_log."""

from __future__ import annotations

from typing import Any

from primespark.ansible_plugins.controller_lookup import ControllerLookup

DOCUMENTATION = """
name: spark_prefect_worker
short_description: a site worker's material, or the worker keys a host authorises
options:
  _terms:
    description: The inventory host name.
  env:
    description: The fleet environment.
    required: true
  keys_only:
    description: Only the public keys of the workers that may log in to the host.
    type: bool
    default: false
"""


class LookupModule(ControllerLookup):
    name = "spark_prefect_worker"

    def find(self, term: str) -> Any:
        from primespark.orchestration.material import authorized_worker_keys, worker_material

        find = authorized_worker_keys if self.get_option("keys_only") else worker_material
        return find(self.get_option("env"), term)
