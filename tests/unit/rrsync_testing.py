"""A remote shell for rsync that does what sshd does for a key with a forced command: it runs the sync role's gate
and through it Debian's rrsync, confined to a folder, with the client's command in SSH_ORIGINAL_COMMAND. So the
transfer engine's tests go through the same restriction as the fleet's sync accounts, without an SSH server."""

from __future__ import annotations

import shutil
import stat
import sys
from pathlib import Path

import pytest

from primespark.data.transfer import Route

RRSYNC = "/usr/bin/rrsync"

FORCED = """#!/bin/sh
# {script} ROOT [rrsync options] -- [-l USER] HOST COMMAND...: what sshd runs for the sync role's
# `command="sync-gate rrsync OPTIONS ROOT"`
root=$1; shift
opts=""
while [ "$1" != "--" ]; do opts="$opts $1"; shift; done
shift
[ "$1" = "-l" ] && shift 2
shift
SSH_ORIGINAL_COMMAND="$*" exec {gate} {rrsync} $opts "$root"
"""
GATE = Path(__file__).resolve().parents[2] / "roles" / "sync" / "files" / "sync-gate"


def forced_route(tmp_path: Path, root: Path, *options: str) -> Route:
    """A route into `root` through rrsync with `options` (e.g. `-wo`, `-no-del`)."""
    if shutil.which("rsync") is None or not Path(RRSYNC).is_file():
        pytest.skip("rsync/rrsync are not installed (make setup installs Debian's rsync, which ships rrsync)")
    script = tmp_path / "forced-rrsync"
    if not script.exists():
        script.write_text(FORCED.format(script=script.name, gate=GATE, rrsync=RRSYNC))
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Route("sync-test@destination", (str(script), str(root), *options, "--"))


def gate_without_xxhash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder that holds `forced_route`'s scripts, through a copy of the gate as it is on a destination without
    python3-xxhash (its hasher's python3 sees no site packages); routes made after this call go through it."""
    folder = tmp_path / "bare-gate"
    folder.mkdir()
    shutil.copy2(GATE, folder / "sync-gate")
    hasher = (GATE.parent / "sync-hash").read_text()
    (folder / "sync-hash").write_text(hasher.replace("#!/usr/bin/python3\n", "#!/usr/bin/python3 -S\n", 1))
    (folder / "sync-hash").chmod(0o755)
    monkeypatch.setattr(sys.modules[__name__], "GATE", folder / "sync-gate")
    return folder
