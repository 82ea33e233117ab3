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
    state_dir_override: Path | None = Field(default=None, alias="SPARK_STATE_DIR")
    secret_backend: Literal["local", "vault"] = "local"
    vault_addr: str | None = Field(default=None, alias="VAULT_ADDR")
    vault_mount: str = "secret"
    vault_prefix: str = "primespark"
    prefect_api_url: str | None = Field(default=None, alias="PREFECT_API_URL")
    # Set on a site's Prefect worker (the prefect_worker role): its store is a read-only copy of its site's
    # secrets, and a repository of another site is opened with the password file on the host restic runs on.
    worker_site: str | None = None
    secret_read_only: bool = False
    # A worker with the vault backend logs in with its AppRole (primespark.orchestration.vault).
    vault_role_id: str | None = None
    vault_secret_id_file: Path | None = None

    @property
    def inventory_dir(self) -> Path:
        return self.root / "inventory"

    def state_path(self, env: str | None = None) -> Path:
        """Where the environment's state lives, without creating it (readers that must not leave a folder)."""
        return self.state_dir_override or (self.state_home / (env or self.env))

    def state_dir(self, env: str | None = None) -> Path:
        """Per-environment state (SSH keys, mesh plan, secrets, Pulumi backend), created with mode 0700."""
        path = self.state_path(env)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)
        return path


def settings_for(env: str) -> Settings:
    """Settings with the per-environment file `.env.<env>` taking precedence over `.env`."""
    return Settings(_env_file=(".env", f".env.{env}"), env=env)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
