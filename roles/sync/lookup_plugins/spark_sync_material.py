"""Lookup: a host's sync key material from the fleet's secret store (the key made there on first use).

Runs on the controller, in the venv where primespark is installed; the result holds a private key, so tasks
using it set no_log.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

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


class LookupModule(LookupBase):
    def run(self, terms: list[str], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        self.set_options(var_options=variables, direct=kwargs)
        try:
            from primespark.data.sync import host_material
        except ImportError as exc:
            raise AnsibleError(f"spark_sync_material needs primespark on the controller: {exc}") from exc
        try:
            return [host_material(self.get_option("env"), host) for host in terms]
        except Exception as exc:  # an operator error (no mesh plan, an unknown host key) for Ansible to show
            raise AnsibleError(f"spark_sync_material: {exc}") from exc
