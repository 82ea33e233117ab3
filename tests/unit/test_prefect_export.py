"""`python -m primespark.monitoring.prefect_export` against a real Prefect server started the way the prefect_server
role starts it (API basic auth, on loopback): pools (ready, paused, absent) and their online workers, agent-task
runs failed, crashed, completed and running, written as one textfile under the registry's names; a server that is
down or refuses the auth string is one line and exit 1, and the previous file stays byte for byte."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Crashed, Failed, Running
from test_flows_deploy import free_port, start_server, wait_healthy

from primespark.monitoring import metrics as m
from primespark.monitoring.prefect_export import INLINE, NAME, Api, read
from primespark.orchestration.agent_runs import FLOW

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    auth = f"spark:{secrets.token_urlsafe(12)}"
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    process = start_server(home, auth, port, ["127.0.0.1"])
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, process, home)
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
            _populate()
        yield url, auth
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def _populate() -> None:
    """spark-edge has a worker online, spark-cloud is paused (its worker online all the same), spark-gone does not
    exist; agent-task runs: summarise failed and crashed, train completed, an inline spec failed and another runs
    now."""
    from prefect import flow

    @flow(name=FLOW)
    def fake(template: str | None = None, name: str | None = None) -> None:
        pass

    with get_client(sync_client=True) as client:
        for pool, paused in (("spark-edge", False), ("spark-cloud", True)):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", is_paused=paused))
            client.send_worker_heartbeat(pool, f"worker-{pool}")
        for parameters, end in (({"template": "summarise"}, Failed()), ({"template": "summarise"}, Crashed()),
                                ({"template": "train"}, Completed()),
                                ({"name": "adhoc"}, Failed()),
                                ({"name": "adhoc"}, None)):
            run = client.create_flow_run(fake, parameters=parameters)
            client.set_flow_run_state(run.id, Running(), force=True)
            if end is not None:
                client.set_flow_run_state(run.id, end, force=True)


def run_export(directory: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run([sys.executable, "-m", "primespark.monitoring.prefect_export", "--textfile-dir",
                           str(directory), "--timeout", "5", *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_pools_workers_and_agent_runs_are_written_under_the_registry_names(server: tuple[str, str],
                                                                            tmp_path: Path) -> None:
    url, auth = server
    done = run_export(tmp_path, {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth}, "--pool", "spark-edge",
                      "--pool", "spark-cloud", "--pool", "spark-gone", "--template", "summarise", "--template", "train",
                      "--template", "idle")
    assert done.returncode == 0, done.stdout + done.stderr
    path = m.textfile_path(tmp_path, NAME)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written whole: no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644
    found = samples(path.read_text())
    pool, failed, running = m.WORK_POOL_READY.name, m.AGENT_TASK_FAILED.name, m.AGENT_TASK_RUNNING.name
    workers = m.WORK_POOL_WORKERS.name
    assert {k: v for k, v in found.items() if k.startswith(("primespark_work_pool", "primespark_agent"))} == {
        f'{pool}{{pool="spark-cloud"}}': 0.0,  # paused: not ready, whatever its workers
        f'{pool}{{pool="spark-edge"}}': 1.0,
        f'{pool}{{pool="spark-gone"}}': 0.0,
        f'{workers}{{pool="spark-cloud"}}': 1.0,
        f'{workers}{{pool="spark-edge"}}': 1.0,
        f'{workers}{{pool="spark-gone"}}': 0.0,
        f'{failed}{{template="summarise"}}': 2.0,  # failed and crashed
        f'{failed}{{template="train"}}': 0.0,
        f'{failed}{{template="idle"}}': 0.0,  # a template of the fleet with no runs: 0, not missing
        f'{failed}{{template="{INLINE}"}}': 1.0,
        f'{running}{{template="summarise"}}': 0.0,
        f'{running}{{template="train"}}': 0.0,
        f'{running}{{template="idle"}}': 0.0,
        f'{running}{{template="{INLINE}"}}': 1.0,
    }
    at = found[m.PREFECT_EXPORT_TIME.name]
    assert abs(at - datetime.now(UTC).timestamp()) < 60


def test_failures_older_than_the_window_are_not_counted(server: tuple[str, str]) -> None:
    url, auth = server
    later = datetime.now(UTC) + timedelta(seconds=m.AGENT_FAILURE_WINDOW_SECONDS + 60)
    found = read(Api(url, auth, timeout=5), ["spark-edge"], ["summarise"], now=later)
    assert found.failed == {"summarise": 0, INLINE: 0}
    assert found.running == {"summarise": 0, INLINE: 1}  # running now, whenever it started
    assert found.at == later.timestamp()


def test_without_pools_named_every_pool_on_the_server_is_written(server: tuple[str, str], tmp_path: Path) -> None:
    url, auth = server
    done = run_export(tmp_path, {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth})
    assert done.returncode == 0, done.stderr
    found = samples(m.textfile_path(tmp_path, NAME).read_text())
    assert {k for k in found if k.startswith(m.WORK_POOL_READY.name)} >= {
        f'{m.WORK_POOL_READY.name}{{pool="spark-edge"}}', f'{m.WORK_POOL_READY.name}{{pool="spark-cloud"}}'}


@pytest.fixture
def not_prefect() -> Iterator[str]:
    """A loopback HTTP server answering every request with JSON that is not the Prefect API's shape."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def _json(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"[1, 2]")

        do_GET = do_POST = _json

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("case", ["down", "wrong auth", "no address", "not the API"])
def test_a_server_it_cannot_read_is_one_line_and_the_old_file_stays(server: tuple[str, str], tmp_path: Path,
                                                                    not_prefect: str, case: str) -> None:
    url, auth = server
    old = m.textfile_path(tmp_path, NAME)
    old.write_bytes(b"# an earlier export\nprimespark_prefect_export_timestamp_seconds 1.0\n")
    before = (old.read_bytes(), old.stat().st_mtime_ns)
    env = {"down": {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "PREFECT_API_AUTH_STRING": auth},
           "wrong auth": {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": "spark:wrong"},
           "no address": {"PREFECT_API_AUTH_STRING": auth},
           "not the API": {"PREFECT_API_URL": not_prefect, "PREFECT_API_AUTH_STRING": auth}}[case]
    done = run_export(tmp_path, env, "--pool", "spark-edge")
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    said = {"down": "is unreachable", "wrong auth": "refused the API auth string (401)",
            "no address": "PREFECT_API_URL is not set", "not the API": "not the Prefect API's"}[case]
    assert said in done.stderr
    assert auth not in done.stderr
    assert (old.read_bytes(), old.stat().st_mtime_ns) == before
    assert [p.name for p in tmp_path.iterdir()] == [old.name]


def test_the_roles_cron_command_reads_the_auth_string_from_the_env_file_and_exports(server: tuple[str, str],
                                                                                    tmp_path: Path) -> None:
    """The prefect_server role's command (its cron line and its run at install), rendered as Ansible renders it,
    against the env file the role writes: the auth string reaches the export and appears in neither."""
    import jinja2
    import yaml

    url, auth = server
    role = Path(__file__).resolve().parents[2] / "roles" / "prefect_server"
    tasks = yaml.safe_load((role / "tasks" / "main.yml").read_text())
    address = next(t for t in tasks if "prefect_server_api_url" in t.get("ansible.builtin.set_fact", {}))
    facts = next(t for t in tasks if "prefect_server_export_command" in t.get("ansible.builtin.set_fact", {}))
    host, port = url.removeprefix("http://").removesuffix("/api").split(":")
    settings = {"addresses": [host], "port": int(port), "auth_string": auth, "database_url": None,
                "pools": ["spark-edge"], "templates": ["summarise"], "served": None, "ca_file": None}
    variables = {"prefect_server_settings": settings, "prefect_server_config_dir": str(tmp_path),
                 "prefect_server_service": "spark-prefect-server", "prefect_server_home": str(tmp_path / "home"),
                 "prefect_server_venv": str(Path(sys.executable).parent.parent), "ansible_managed": "test",
                 "prefect_server_textfile_dir": str(tmp_path / "textfile"), "prefect_server_export_timeout": 5}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    (tmp_path / "spark-prefect-server.env").write_text(
        env.from_string((role / "templates" / "prefect-server.env.j2").read_text()).render(variables))
    variables["prefect_server_api_url"] = env.from_string(
        address["ansible.builtin.set_fact"]["prefect_server_api_url"]).render(variables)  # a fact the task before set
    assert variables["prefect_server_api_url"] == url
    command = env.from_string(facts["ansible.builtin.set_fact"]["prefect_server_export_command"]).render(variables)
    assert auth not in command
    (tmp_path / "textfile").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(["/bin/sh", "-c", command], env=clean, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = samples(m.textfile_path(tmp_path / "textfile", NAME).read_text())
    assert found[f'{m.WORK_POOL_READY.name}{{pool="spark-edge"}}'] == 1.0
    assert found[f'{m.AGENT_TASK_FAILED.name}{{template="summarise"}}'] == 2.0
