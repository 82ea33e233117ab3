"""Lookup: the Alertmanager receivers' secrets of an environment, as {file name: value}, from its secret store.

Runs on the controller, in the venv where primespark is installed; the values are secrets, so tasks using it
set no_log.
"""

from __future__ import annotations

from typing import Any

from primespark.ansible_plugins.controller_lookup import ControllerLookup

DOCUMENTATION = """
name: spark_monitoring_secrets
short_description: Alertmanager receivers' secrets of one environment
options:
  _terms:
    description: The fleet environment.
"""


class LookupModule(ControllerLookup):
    name = "spark_monitoring_secrets"

    def find(self, term: str) -> Any:
        from primespark.monitoring.alertmanager import receiver_secrets

        return receiver_secrets(term)
