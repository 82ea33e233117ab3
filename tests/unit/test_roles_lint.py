"""The playbooks parse and the roles pass ansible-lint's production profile (offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's tools, wherever the venv is


def test_ansible_lint_production_profile_is_clean() -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    result = subprocess.run([str(BIN / "ansible-lint"), "--nocolor"], cwd=REPO, capture_output=True, text=True,
                            env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output


def test_playbooks_pass_syntax_check() -> None:
    result = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "site.yml", "edge.yml"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
