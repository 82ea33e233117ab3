"""Lookup: what the Prefect server's host needs, from the fleet and the secret store on the controller (its
listen addresses, the API auth string, a PostgreSQL URL if the fleet names one). Tasks using it set no_log."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

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


class LookupModule(LookupBase):
    def run(self, terms: list[str], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        self.set_options(var_options=variables, direct=kwargs)
        try:
            from primespark.orchestration.material import server_material
        except ImportError as exc:
            raise AnsibleError(f"spark_prefect_server needs primespark on the controller: {exc}") from exc
        try:
            return [server_material(self.get_option("env"), host) for host in terms]
        except Exception as exc:  # an operator error (no orchestration section, no mesh plan) for Ansible to show
            raise AnsibleError(f"spark_prefect_server: {exc}") from exc
