"""Hosts on this machine that can drop off the network: each host a folder of its own (its task results in
`<folder>/tasks`, not the fleet's shared hot tier path), every command run through a valve that passes its output
on until the host is cut off. From then on nothing comes back and a liveness probe gets no answer, while what runs
on the host goes on (its processes are in a session of their own, as on a host whose network is cut)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from primespark.hosts import Completed, Liveness, LocalRunner, Runner

# scaled down from execute.LIVENESS so that a test takes seconds, not half a minute
FAST = Liveness(heartbeat=0.2, silent_after=1.0, probe_timeout=1.0)

# python -c VALVE CUT -- ARGV...: ARGV run as the host runs it; once the file CUT exists nothing comes back, and a
# new command (a probe) hangs unanswered
VALVE = r"""
import os, shutil, signal, subprocess, sys, threading
cut, argv = sys.argv[1], sys.argv[3:]
if os.path.exists(cut):
    signal.pause()
child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
errors = threading.Thread(target=shutil.copyfileobj, args=(child.stderr, sys.stderr.buffer), daemon=True)
errors.start()
for line in child.stdout:
    if not os.path.exists(cut):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
errors.join()
sys.exit(child.wait())
"""


class FolderRunner(LocalRunner):
    def __init__(self, name: str, folder: Path) -> None:
        super().__init__(name, prefix=[sys.executable, "-c", VALVE, str(folder / "cut"), "--"])
        self.python = sys.executable
        self.folder = folder

    def stream(self, argv: Sequence[str], *, on_line: Callable[[str], None], env: Mapping[str, str] | None = None,
               stdin: bytes | None = None, timeout: float | None = None,
               liveness: Liveness | None = None) -> Completed:
        # the host-side script's request names the fleet's results folder: this host keeps its own
        if stdin is not None:
            request = json.loads(stdin)
            if isinstance(request, dict) and "root" in request:
                stdin = json.dumps({**request, "root": str(self.folder / "tasks")}).encode()
        return super().stream(argv, on_line=on_line, env=env, stdin=stdin, timeout=timeout, liveness=liveness)


class FolderHosts:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, host: str) -> Path:
        return self.root / host

    def tasks(self, host: str) -> Path:
        return self.folder(host) / "tasks"

    def runner(self, host: str) -> Runner:
        self.folder(host).mkdir(parents=True, exist_ok=True)
        return FolderRunner(host, self.folder(host))

    def cut(self, host: str) -> None:
        """The host drops off the network: from now on nothing comes back from it and it answers no probe."""
        self.folder(host).mkdir(parents=True, exist_ok=True)
        (self.folder(host) / "cut").touch()

    def restore(self, host: str) -> None:
        (self.folder(host) / "cut").unlink()
