"""The `lab` fixture: one lab per pytest run, shared by every end-to-end test.

It holds the machine-wide lab lock (/tmp/spark-lab.lock) for the whole session, so parallel pytest runs
by different people queue up; it brings the lab up from scratch once and takes it down at the end, also
when tests fail. `SPARK_LAB_KEEP=1` leaves the lab running afterwards for a look around.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from primespark.errors import UserError
from primespark.fleet import Fleet, load_fleet
from primespark.lab import Lab, UpResult
from primespark.lab.lock import lab_lock
from primespark.lab.runtime import LABEL
from primespark.lab.ssh import ssh_argv
from primespark.playbook import RunResult, run_ansible

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's tools, wherever the venv is
# lab_cli.SPARK, not imported from there: test_lab loads this file alone, from another rootdir
SPARK = str(BIN / "spark")
GENERATOR_PAUSE = "/var/lib/primespark/lab-generator/paused"  # roles/lab_generator's pause file
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Runs inside a lab host: try TCP connections in parallel, print which ones opened.
PROBE = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
targets, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
def try_one(t):
    try:
        socket.create_connection((t[0], t[1]), timeout=timeout).close()
        return True
    except OSError:
        return False
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(try_one, targets))))
"""


def docker_snapshot(fleet: str) -> tuple[set[str], set[str]]:
    """The lab's containers (id name) and networks (id name): what carries its label. Anything else on the
    machine (another user's containers, another lab) is not the lab's to compare."""
    label = f"label={LABEL}={fleet}"
    containers = subprocess.run(["docker", "ps", "-a", "--filter", label, "--format", "{{.ID}} {{.Names}}"],
                                capture_output=True, text=True, check=True).stdout.split("\n")
    networks = subprocess.run(["docker", "network", "ls", "--filter", label, "--format", "{{.ID}} {{.Name}}"],
                              capture_output=True, text=True, check=True).stdout.split("\n")
    return {c for c in containers if c}, {n for n in networks if n}


@dataclass
class LabHandle:
    fleet: Fleet
    state_dir: Path
    lab: Lab
    first_up: UpResult
    baseline: tuple[set[str], set[str]]  # the lab's containers and networks before it existed

    @property
    def prefect_api_url(self) -> str:
        """The lab's Prefect server, on the host the fleet names (the `prefect` fixture installs it)."""
        return f"{self.lab.prefect_url}/api"

    def docker_state(self) -> tuple[set[str], set[str]]:
        return docker_snapshot(self.fleet.name)

    def container(self, host: str) -> str:
        return self.lab.plan().container(host).name

    def exec(self, host: str, command: str | list[str], user: str = "root",
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command in the host's container (docker exec), no SSH involved."""
        argv = ["sh", "-c", command] if isinstance(command, str) else command
        return subprocess.run(["docker", "exec", "-u", user, self.container(host), *argv],
                              capture_output=True, text=True, timeout=timeout)

    def ssh(self, host: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command over real SSH as the host's fleet user, with the lab's key and known_hosts."""
        return subprocess.run(ssh_argv(self.state_dir, self.fleet, host, command),
                              capture_output=True, text=True, timeout=timeout)

    def probe(self, host: str, targets: list[tuple[str, int]], timeout: float = 2.0) -> dict[tuple[str, int], bool]:
        """From inside `host`: which TCP connections open."""
        done = self.exec(host, ["python3", "-c", PROBE, json.dumps(targets), str(timeout)])
        assert done.returncode == 0, done.stderr
        return dict(zip(targets, json.loads(done.stdout), strict=True))

    @contextlib.contextmanager
    def generator_paused(self, *hosts: str) -> Iterator[None]:
        """The lab_generator (which site.yml starts on every Pi) still on `hosts`: the pause file, then its write
        lock, so that a write in flight has ended before the test looks. Resumed at the end, also on failure."""
        try:
            for host in hosts:
                done = self.exec(host, f"mkdir -p $(dirname {GENERATOR_PAUSE}) && touch {GENERATOR_PAUSE} && "
                                       f"flock {GENERATOR_PAUSE}.lock true")
                assert done.returncode == 0, done.stderr
            yield
        finally:
            for host in hosts:
                self.exec(host, f"rm -f {GENERATOR_PAUSE}")

    def playbook(self, book: str | Path, limit: str | None = None, extravars: dict[str, Any] | None = None,
                 check: bool = True) -> RunResult:
        """A playbook (site.yml, or one a test wrote) through ansible-runner, with the repo's ansible.cfg and the lab
        inventory. A failed run fails the test with its failed tasks, unless `check=False` (a run that should fail)."""
        run = run_ansible(Path(f"inventory/{self.fleet.name}.fleet.yml"), playbook=str(book), limit=limit,
                          extravars=extravars, root=REPO)
        if check:
            assert run.rc == 0, "\n".join(run.failed_tasks) or run.output[-3000:]
        return run

    def ansible(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Ansible from the repo's venv with the repo's ansible.cfg and the lab inventory."""
        env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
        return subprocess.run([str(BIN / "ansible"), "-i", f"inventory/{self.fleet.name}.fleet.yml",
                               *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _docker_or_skip(lab: Lab) -> None:
    from primespark.lab.runtime import docker_client

    try:
        docker_client()
        return
    except UserError as first:
        # Start a daemon where nothing else does, as `make setup` would.
        subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "docker"], capture_output=True)
        try:
            docker_client()
            return
        except UserError:
            reason = f"the lab needs Docker and none can be reached or started here: {first.message}"
    if IN_CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `rebuilds_lab` first (the lab down and up again, a container removed by hand): run later, they
    would wipe what the session's fixtures (`prefect`, `configured`) had installed for the tests after them. Then
    those marked `bare_lab` (a role's first run on hosts that never had it), before anything runs site.yml."""
    items.sort(key=lambda item: (item.get_closest_marker("rebuilds_lab") is None,
                                 item.get_closest_marker("bare_lab") is None))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Iterator[None]:
    """Wait for the lab lock before the first lab test starts, not inside it: another run's lab may hold the lock
    for longer than a test's timeout. The `lab` fixture then finds it held by this process."""
    wanted = not session.config.option.collectonly and any(item.get_closest_marker("lab") for item in session.items)
    with lab_lock() if wanted else contextlib.nullcontext():
        yield


@pytest.fixture(scope="session")
def lab() -> Iterator[LabHandle]:
    fleet = load_fleet(str(REPO / "inventory" / "lab.yaml"))
    the_lab = Lab(fleet)
    _docker_or_skip(the_lab)
    with contextlib.ExitStack() as stack:
        stack.enter_context(lab_lock())
        the_lab.down()  # a fresh lab: nothing left from earlier work changes what the tests see
        baseline = docker_snapshot(fleet.name)
        try:
            first_up = the_lab.up()
            yield LabHandle(fleet, the_lab.state_dir, the_lab, first_up, baseline)
        finally:
            if os.environ.get("SPARK_LAB_KEEP") != "1":
                the_lab.down()
                after = docker_snapshot(fleet.name)
                assert after == baseline, (f"lab down left Docker changed: containers {after[0] ^ baseline[0]}, "
                                           f"networks {after[1] ^ baseline[1]}")
                if the_lab.openbao is not None:  # stopped, its data (and the key to it) kept
                    assert the_lab.openbao.pid() is None and the_lab.openbao.state() == "not running"
                    assert the_lab.openbao.credentials_file.is_file() and the_lab.openbao.data_dir.is_dir()


@dataclass
class PrefectApi:
    url: str
    auth: str
    ca_file: Path | None  # the fleet CA that verifies it (the controller's copy), where it serves TLS

    def env(self) -> dict[str, str]:
        """For a child process that talks to it (spark reads the CA itself; Prefect's own CLI needs it named)."""
        return {"PREFECT_API_URL": self.url, **({"PREFECT_API_SSL_CERT_FILE": str(self.ca_file)} if self.ca_file
                                                 else {})}


@pytest.fixture(scope="session")
def prefect(lab: LabHandle) -> Iterator[PrefectApi]:
    """The lab's Prefect server on its fleet host (ops-1), as site.yml's server play installs it: the mesh plan
    first (the server listens on its mesh address too), then spark_venv + prefect_server there. Prefect in this
    process points at it, with the API auth string, for the whole session."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_URL,
        temporary_settings,
    )

    from primespark.context import FleetContext
    from primespark.orchestration.material import auth_string

    planned = subprocess.run([SPARK, "mesh", "plan", "--env", lab.fleet.name], capture_output=True, text=True,
                             timeout=120)
    assert planned.returncode == 0, planned.stderr
    assert lab.fleet.orchestration is not None
    server = lab.fleet.orchestration.server.host
    book = lab.state_dir / "prefect-server-play.yml"
    book.write_text(json.dumps([{"name": "Prefect server", "hosts": server, "become": True,
                                 "roles": ["tls", "spark_venv", "prefect_server"]}]))
    lab.playbook(book, limit=server)
    api = PrefectApi(lab.prefect_api_url, auth_string(FleetContext.load(lab.fleet.name)), lab.lab.fleet_ca_file)
    with temporary_settings(updates={PREFECT_API_URL: api.url, PREFECT_API_AUTH_STRING: api.auth,
                                     PREFECT_API_SSL_CERT_FILE: str(api.ca_file) if api.ca_file else None}):
        yield api


@pytest.fixture(scope="session")
def configured(lab: LabHandle) -> RunResult:
    """site.yml applied to every lab host once per session (the roles' tests run it again themselves)."""
    return lab.playbook("site.yml")


@pytest.fixture(scope="session")
def deployed(lab: LabHandle, prefect: PrefectApi, configured: RunResult) -> subprocess.CompletedProcess[str]:
    """site.yml's server and workers (the session's `configured`), then the fleet's deployments on their pools,
    once per session: `spark flows deploy` as an operator runs it (the CLI finds the server itself), without the
    continuous jobs' watch runs: the tests that need a still source or their own pass start what they need."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([str(BIN / "spark"), "flows", "deploy", "--no-watch", "--env", lab.fleet.name],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def lab_flows(lab: LabHandle, prefect: PrefectApi) -> Iterator[None]:
    """Flows run here report to the lab's Prefect server on its fleet host (the `prefect` fixture), with no
    repository writer or drill slot left held: a slot held by a run killed earlier would block every backup.
    This session owns the lab (its lock), so it starts from zero."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    from primespark.orchestration.locks import drill_lock, repository_lock

    assert lab.fleet.backup is not None
    with get_client(sync_client=True) as client:  # the `prefect` fixture points this process at the lab's server
        slots = [*map(repository_lock, lab.fleet.backup.repositories), *map(drill_lock, lab.fleet.backup.plans)]
        for name in slots:
            with contextlib.suppress(ObjectNotFound):
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    yield
