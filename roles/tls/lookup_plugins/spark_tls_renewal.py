"""Lookup on the controller: `spark_tls_renewal` is what a host needs to renew its own certificate (the renewer's
configuration, the path of the renewer to copy, and the secret-id of the host's TLS AppRole, made once in the
secret store and registered with the AppRole: primespark.pki.renewal_material). The secret-id is private: tasks
using it set no_log."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

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


class LookupModule(LookupBase):
    def run(self, terms: list[str], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        self.set_options(var_options=variables, direct=kwargs)
        try:
            from primespark.pki import renewal_material
        except ImportError as exc:
            raise AnsibleError(f"spark_tls_renewal needs primespark on the controller: {exc}") from exc
        try:
            return [renewal_material(self.get_option("env"), host) for host in terms]
        except Exception as exc:  # an operator error (no CA yet, a store that does not answer) for Ansible
            raise AnsibleError(f"spark_tls_renewal: {exc}") from exc
