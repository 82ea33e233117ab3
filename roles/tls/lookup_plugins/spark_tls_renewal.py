"""Lookup on the controller: `spark_tls_renewal` is what a host needs to renew its own certificate (the renewer's
configuration, the path of the renewer to copy, and the secret-id of the host's TLS AppRole, made once in the
secret store and registered with the AppRole: primespark.pki.renewal_material). The secret-id is private: tasks
using it set no_log."""

from __future__ import annotations

from typing import Any

from primespark.ansible_plugins.controller_lookup import ControllerLookup

DOCUMENTATION = """
name: spark_tls_renewal
short_description: a host's certificate renewal material
options:
  _terms:
    description: The inventory host name.
  env:
    description: The fleet environment.
    required: true
"""


class LookupModule(ControllerLookup):
    name = "spark_tls_renewal"

    def find(self, term: str) -> Any:
        from primespark.pki import renewal_material

        return renewal_material(self.get_option("env"), term)
