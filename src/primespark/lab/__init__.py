"""The lab: every host of a lab fleet file as a Docker container on this machine (`spark lab ...`)."""

from primespark.lab.core import Lab, LabStatus, UpResult

__all__ = ["Lab", "LabStatus", "UpResult"]
