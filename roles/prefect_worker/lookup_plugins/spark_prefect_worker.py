"""Lookups on the controller: `spark_prefect_worker` is everything a site's worker holds (its SSH key, its site's
repository passwords, the API's address and auth string); `spark_prefect_worker_keys` the worker keys one host
authorises. Made in the secret store on first use. The first holds private material: tasks using it set no_log."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

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


class LookupModule(LookupBase):
    def run(self, terms: list[str], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        self.set_options(var_options=variables, direct=kwargs)
        try:
            from primespark.orchestration.material import authorized_worker_keys, worker_material
        except ImportError as exc:
            raise AnsibleError(f"spark_prefect_worker needs primespark on the controller: {exc}") from exc
        find = authorized_worker_keys if self.get_option("keys_only") else worker_material
        try:
            return [find(self.get_option("env"), host) for host in terms]
        except Exception as exc:  # an operator error (no orchestration section, no known host key) for Ansible
            raise AnsibleError(f"spark_prefect_worker: {exc}") from exc
