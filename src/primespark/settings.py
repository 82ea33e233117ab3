"""Run-time settings: `SPARK_*` environment variables, then `.env.<env>`, then `.env`, then defaults.

Settings say where things live and which backends to use; what the fleet *is* stays in the inventory.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from primespark.errors import UserError
from primespark.folders import private_folder


def _repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "inventory").is_dir() and (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd()


def _default_state_home() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "primespark"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARK_", env_file=(".env",), extra="ignore")

    env: str = Field(default="lab", description="The environment commands act on when none is named.")
    root: Path = Field(default_factory=_repo_root, description="The checkout: inventory/, roles/, flows/ …")
    state_home: Path = Field(default_factory=_default_state_home, description="State of every environment.")
    # A string, not a Path: "" would become "." (the current folder) before anyone could refuse it.
    state_dir_override: str | None = Field(default=None, alias="SPARK_STATE_DIR")
    # Where secrets live is the fleet file's `secrets:` section. These older settings are read only to refuse one
    # that disagrees with it: commands would look for secrets elsewhere and make new ones there.
    secret_backend: Literal["local", "vault"] | None = None
    vault_mount: str | None = None
    vault_prefix: str | None = None
    prefect_api_url: str | None = Field(default=None, alias="PREFECT_API_URL")
    # Set on a site's Prefect worker (the prefect_worker role): its store is a read-only copy of its site's
    # secrets, and a repository of another site is opened with the password file on the host restic runs on.
    worker_site: str | None = None
    secret_read_only: bool = False
    # A worker with the vault backend logs in with its AppRole (primespark.orchestration.vault), at the address
    # it reaches the server on (VAULT_ADDR in its env file; read only on a worker, with a role-id).
    vault_addr: str | None = Field(default=None, alias="VAULT_ADDR")
    vault_role_id: str | None = None
    vault_secret_id_file: Path | None = None
    # The audit log signs a checkpoint of its chain every this many records (0: never; docs/audit.md). Set, it
    # overrides the fleet's `audit.checkpoint_every`.
    audit_checkpoint_every: int = Field(default=100, ge=0)

    @property
    def inventory_dir(self) -> Path:
        return self.root / "inventory"

    def state_path(self, env: str | None = None) -> Path:
        """Where the environment's state lives, without creating it (readers that must not leave a folder).
        SPARK_STATE_DIR must be an absolute path: empty or relative, keys would land in whatever folder the
        command runs from (inside a checkout: untracked private keys)."""
        override = self.state_dir_override
        if override is None:
            return self.state_home / (env or self.env)
        if not override.strip():
            raise UserError("SPARK_STATE_DIR is set but empty",
                            "unset it (state then lives in ~/.local/state/primespark/<env>) or give an absolute path")
        if not Path(override).is_absolute():
            raise UserError(f"SPARK_STATE_DIR={override!r} is a relative path: the state would follow the current "
                            "folder", "give an absolute path, e.g. SPARK_STATE_DIR=$HOME/spark-state")
        return Path(override)

    def state_dir(self, env: str | None = None) -> Path:
        """Per-environment state (SSH keys, mesh plan, secrets, Pulumi backend): made 0700 when missing; an
        existing folder is used only when it is already private (its mode is never changed)."""
        path = self.state_path(env)
        if self.state_dir_override is None:
            fix = f"make {path} a folder of your own (mode 0700), or set SPARK_STATE_DIR to a new folder"
            return private_folder(path, "the state directory", fix, make_parents=True)
        fix = ("point SPARK_STATE_DIR at a folder that does not exist yet, in a folder that does (spark makes it, "
               f"mode 0700), or at a folder of your own with mode 0700 (`chmod 700 {path}` if it is yours)")
        return private_folder(path, "SPARK_STATE_DIR", fix)


def settings_for(env: str) -> Settings:
    """Settings with the per-environment file `.env.<env>` taking precedence over `.env`."""
    return Settings(_env_file=(".env", f".env.{env}"), env=env)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
