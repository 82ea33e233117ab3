"""What the roles' lookup plugins share (roles/*/lookup_plugins/spark_*.py): each asks one primespark function, on
the controller, for what a role installs (a host's material, an environment's secrets) and hands Ansible the
project's own error when it fails (no fleet file, no mesh plan, a sealed store), prefixed with the plugin's name.
The roles' tasks hide the results (no_log: they hold keys) and show that error from their block's rescue."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase


class ControllerLookup(LookupBase):
    name = ""  # the plugin's name, which its errors start with

    def find(self, term: str) -> Any:
        """The value for one term (a host, or an environment)."""
        raise NotImplementedError

    def run(self, terms: list[str], variables: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        self.set_options(var_options=variables, direct=kwargs)
        try:
            return [self.find(term) for term in terms]
        except Exception as exc:  # an operator's error, in the project's words, for Ansible to show
            raise AnsibleError(f"{self.name}: {exc}") from exc
