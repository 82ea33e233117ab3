"""The lab: every host of a lab fleet file as a Docker container on this machine (`spark lab ...`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from primespark.lab.core import Lab, LabStatus, UpResult

__all__ = ["Lab", "LabStatus", "UpResult"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: commands that only read the lab's OpenBao token (`primespark.lab.openbao`) need
    # neither Docker's SDK nor the rest of the lab.
    if name in __all__:
        from primespark.lab import core

        return getattr(core, name)
    raise AttributeError(name)
