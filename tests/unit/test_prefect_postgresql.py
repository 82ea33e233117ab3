"""orchestration.server.postgresql: the prefect_server role's PostgreSQL, as its files and commands make it, run
with Debian's PostgreSQL here: the server's OS user (root) gets in as `prefect` by peer authentication over the Unix
socket, nothing listens on TCP, the role's database step is idempotent, and Prefect's migrations run on it as the
database's owner (not a superuser: the extensions they create must be trusted ones)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest
import sqlalchemy as sa
import yaml
from postgres_testing import BIN, POSTGRES, running, scratch_folder
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from primespark.orchestration.material import LOCAL_POSTGRESQL_URL

ROLE = Path(__file__).resolve().parents[2] / "roles" / "prefect_server"
SOCKET_DIR = "/var/run/postgresql"


def render(template: str) -> str:
    return jinja2.Template((ROLE / "templates" / template).read_text()).render(ansible_managed="managed by a test")


def database_step() -> str:
    """The role's shell script that makes the role and the database."""
    tasks = yaml.safe_load((ROLE / "tasks" / "postgresql.yml").read_text())
    [script] = [t["ansible.builtin.shell"] for t in tasks if t["name"].startswith("Create the server's database")]
    return str(script)


@pytest.fixture
def cluster() -> Iterator[Path]:
    """A cluster started with the role's settings and authentication files; yields its socket's folder."""
    work = scratch_folder("peer authentication maps the server's OS user root: needs root")
    postgres_user = pwd.getpwnam("postgres")  # the package's account: the role's step runs its commands as it
    as_postgres = ["setpriv", f"--reuid={postgres_user.pw_uid}", f"--regid={postgres_user.pw_gid}",
                   "--clear-groups", "--"]
    try:
        for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
            (work / name).write_text(render(f"{name}.j2"))
        os.chown(work, postgres_user.pw_uid, postgres_user.pw_gid)
        subprocess.run([*as_postgres, str(BIN / "initdb"), "-D", str(work / "data"), "-U", "postgres"],
                       check=True, capture_output=True, timeout=120, cwd="/")
        # the role's drop-in, with the socket in this folder instead of the host's
        with (work / "data" / "postgresql.conf").open("a") as conf:
            conf.write(f"include '{work / 'postgresql.conf'}'\nunix_socket_directories = '{work}'\n"
                       f"hba_file = '{work / 'pg_hba.conf'}'\nident_file = '{work / 'pg_ident.conf'}'\n")
        with running([*as_postgres, str(POSTGRES[-1]), "-D", str(work / "data")], ["-h", str(work)]):
            yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_role_templates_listen_on_the_socket_only_and_admit_only_peers() -> None:
    conf = render("postgresql.conf.j2")
    assert "listen_addresses = ''" in conf and f"unix_socket_directories = '{SOCKET_DIR}'" in conf
    rules = [line.split() for line in render("pg_hba.conf.j2").splitlines() if line and not line.startswith("#")]
    assert rules and all(rule[0] == "local" and rule[3] == "peer" for rule in rules), rules
    url = make_url(LOCAL_POSTGRESQL_URL)  # the socket, no TCP host, no password
    assert (url.query["host"], url.host, url.password, url.username) == (SOCKET_DIR, None, None, "prefect")


def test_the_server_reaches_its_database_as_prefect_over_the_socket_and_migrates_it(cluster: Path) -> None:
    step = ["sh", "-c", database_step()]
    env = {**os.environ, "PGHOST": str(cluster)}
    first = subprocess.run(step, capture_output=True, text=True, timeout=60, check=False, cwd="/", env=env)
    assert first.returncode == 0 and "created role" in first.stdout and "created database" in first.stdout, first
    again = subprocess.run(step, capture_output=True, text=True, timeout=60, check=False, cwd="/", env=env)
    assert again.returncode == 0 and "created" not in again.stdout, again  # a second run changes nothing

    url = LOCAL_POSTGRESQL_URL.replace(SOCKET_DIR, str(cluster))

    async def ask() -> tuple[str, str, bool]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                row = (await connection.execute(sa.text(
                    "SELECT current_user, current_setting('listen_addresses'), "
                    "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"))).one()
                return row[0], row[1], row[2]
        finally:
            await engine.dispose()

    # a loop of its own, never installed: asyncio.run would leave the main thread without one, and Pulumi's mocks
    # in a later test of this worker ask for it
    loop = asyncio.new_event_loop()
    try:
        user, listen, superuser = loop.run_until_complete(ask())
    finally:
        loop.close()
    assert (user, listen, superuser) == ("prefect", "", False)

    # Prefect's own migrations, as the server runs them at its first start, with the URL the role writes
    home = cluster / "prefect-home"
    migrate = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"],
        capture_output=True, text=True, timeout=300, check=False, cwd="/",
        env={**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_DATABASE_CONNECTION_URL": url})
    assert migrate.returncode == 0 and "Migrations succeeded" in migrate.stdout, migrate.stdout + migrate.stderr
    tables = subprocess.run(["psql", "-XtAq", "-h", str(cluster), "-U", "prefect", "prefect", "-c",
                             "SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'"],
                            capture_output=True, text=True, timeout=30, check=False, cwd="/")
    assert tables.stdout.strip() == "1", tables.stdout + tables.stderr


def test_another_os_user_is_refused(cluster: Path) -> None:
    subprocess.run(["sh", "-c", database_step()], check=True, capture_output=True, timeout=60, cwd="/",
                   env={**os.environ, "PGHOST": str(cluster)})
    nobody = pwd.getpwnam("nobody")
    other = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                            "psql", "-XtAq", "-h", str(cluster), "-U", "prefect", "prefect", "-c", "SELECT 1"],
                           capture_output=True, text=True, timeout=30, check=False, cwd="/")
    assert other.returncode != 0 and "Peer authentication failed" in other.stderr, other.stderr
