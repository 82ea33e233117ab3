"""Lookup: the Alertmanager receivers' secrets of an environment, as {file name: value}, from its secret store.

Runs on the controller, in the venv where primespark is installed; the values are secrets, so tasks using it
set no_log.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

DOCUMENTATION = """
name: spark_monitoring_secrets
short_description: Alertmanager receivers' secrets of one environment
options:
  _terms:
    description: The fleet environment.
"""


class LookupModule(LookupBase):
    def run(self, terms: list[str], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        self.set_options(var_options=variables, direct=kwargs)
        try:
            from primespark.monitoring.alertmanager import receiver_secrets
        except ImportError as exc:
            raise AnsibleError(f"spark_monitoring_secrets needs primespark on the controller: {exc}") from exc
        try:
            return [receiver_secrets(env) for env in terms]
        except Exception as exc:  # a missing or unreadable secret, for Ansible to show
            raise AnsibleError(f"spark_monitoring_secrets: {exc}") from exc
