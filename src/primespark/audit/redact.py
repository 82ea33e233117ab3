"""Parameters as recorded: every value that may be a secret replaced by its HMAC-SHA256 (as Vault's audit
devices do), so a record can say "the same password as last time" without holding it.

Fail closed: a string is written as it is only under a parameter name known to hold no secret (`PLAIN`) and
when it does not look like one (a PEM block, a WireGuard key, a Vault token, a URL with a password); every
other string is HMAC'd. Numbers, booleans and None stay as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any

PLAIN = frozenset({
    "env", "old_env", "host", "hosts", "client", "repository", "mesh", "job", "source", "site", "transport",
    "dry_run", "check", "repair", "offsite", "retries", "retry_delay_seconds", "accept_shrink",
    "accept_empty_source", "bwlimit", "duration", "duration_seconds", "textfile", "snapshot_time", "yes", "to",
    "remove_local", "on_worker", "out", "publish", "reach", "as_json", "no_ssh", "since", "operation", "command",
    "arch", "python", "glibc", "interval_seconds", "max_passes", "threads", "reason",
})

_SECRET_SHAPES = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----"  # PEM and OpenSSH private keys
    r"|^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"  # a WireGuard key (32 bytes, base64)
    r"|\b(?:hv[sbr]|s|b|r)\.[A-Za-z0-9_-]{20,}"  # Vault/OpenBao tokens
    r"|://[^/\s:@]+:[^/\s@]+@"  # user:password@ in a URL
)
# In free text (error messages): the same shapes, replaced where they stand.
_SECRET_SPANS = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
    # not \b: a key may begin with + or /, which no word boundary precedes after a space
    r"|(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]="
    r"|\b(?:hv[sbr]|s|b|r)\.[A-Za-z0-9_-]{20,}"
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)", re.S)

UNAVAILABLE = "redacted (no audit key)"


def looks_secret(value: str) -> bool:
    return bool(_SECRET_SHAPES.search(value))


class Redactor:
    """HMACs with the audit key, fetched from the secret store only when a value needs it (most records hold
    none). Without a key, values are redacted outright: the record is still written, and says why."""

    def __init__(self, key: Callable[[], bytes]) -> None:
        self._get_key = key
        self._key: bytes | None = None
        self.problem: str | None = None

    def _hmac(self, value: str) -> str:
        if self._key is None and self.problem is None:
            try:
                self._key = self._get_key()
            except Exception as exc:  # any store failure: the value is redacted, the record still written
                self.problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if self._key is None:
            return UNAVAILABLE
        return "hmac-sha256:" + hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()

    def value(self, name: str, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {str(k): self.value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(name, v) for v in value]
        text = str(value)
        if name in PLAIN and not looks_secret(text):
            return text
        return self._hmac(text)

    def parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return {name: self.value(name, value) for name, value in parameters.items()}

    def text(self, text: str) -> str:
        """Free text (an error message): secret-shaped spans HMAC'd in place."""
        return _SECRET_SPANS.sub(lambda m: self._hmac(m.group(0)), text)
