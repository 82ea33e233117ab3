"""Backups and DR drills over restic: where repositories are, how hosts reach them, and the drill logic.

The Prefect flows in `flows/` are thin: they call into here, so the logic is testable without Prefect.
"""
