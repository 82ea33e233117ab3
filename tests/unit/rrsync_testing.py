"""A remote shell for rsync that does what sshd does for a key with a forced command: it runs the sync role's gate
and through it Debian's rrsync, confined to a folder, with the client's command in SSH_ORIGINAL_COMMAND. So the
transfer engine's tests go through the same restriction as the fleet's sync accounts, without an SSH server."""

from __future__ import annotations

import shutil
import stat
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
