"""End to end in the lab: restic on the hosts over SSH, repositories in SFTP accounts on the NAS and (offsite)
on ops-1, flows run in this process and reported to the lab's Prefect server on ops-1.

Set-up: the `restic` role on the backup clients and the drill's scratch host, the `nas` role on nas-1 (its
accounts, and every client's authorised key from the secret store, as site.yml does). The `nas` role makes
accounts only on the primary repository's host, so the fixture applies the same role to ops-1 with the offsite
accounts (`backup-<client>` in `<offsite path>/<client>`) in play vars — the offsite account set-up is this
fixture's.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.lab
FAST = {"retries": 2, "retry_delay_seconds": 1.0}

SOURCE_DATA = """
set -e
mkdir -p {root}/docs {root}/models/v1
head -c 3000000 /dev/urandom > {root}/models/v1/weights.bin
head -c 20000 /dev/urandom > {root}/docs/report.pdf
printf 'readings %s\\n' {host} > {root}/docs/readme.txt
ln -sf docs/readme.txt {root}/link
echo scratch > {root}/junk.tmp
"""

# Regular files but *.tmp, each sha256 by "./path". Read with O_NOATIME: the test's reading is not a use (the tier
# policy ages the lab's generated files by access time; a later test expects those dated back to still look old).
SHA_TREE = """
import hashlib, json, os, sys
root, found = sys.argv[1], {}
for folder, dirs, names in os.walk(root):
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".tmp") or os.path.islink(path) or not os.path.isfile(path):
            continue
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOATIME), "rb") as handle:
            found["./" + os.path.relpath(path, root)] = hashlib.file_digest(handle, "sha256").hexdigest()
print(json.dumps(found))
"""


def sha_tree(lab, host: str, root: str) -> dict[str, str]:
    done = lab.exec(host, ["python3", "-c", SHA_TREE, root])
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def backups(lab, lab_flows, tmp_path_factory):
    fleet = lab.fleet
    spec = fleet.backup
    assert spec is not None
    clients = sorted({"pi-1", "nas-1", spec.drill.scratch_host})
    offsite_name = next(n for n, r in spec.repositories.items() if r.copy_from)
    offsite = spec.repositories[offsite_name]
    offsite_accounts = [{"client": c, "nas": offsite.host, "repository": offsite_name, "user": f"backup-{c}",
                         "chroot": f"{offsite.path}/{c}", "path": "/repo"} for c in spec.plans]
    # each client's public key from the secret store, as site.yml's NAS play takes them: a key list made from
    # this play's facts would leave out the clients it does not run on (pi-2) and lock their backups out
    keys = [{"name": "Each client's public backup key, from the secret store", "ansible.builtin.set_fact": {
        "nas_backup_authorized_keys": "{{ nas_backup_authorized_keys | default({}) | combine({item.client: "
                                      "lookup('spark_backup_material', item.client, env=spark_fleet).public_keys}) }}"},
             "loop": "{{ spark_backup_accounts }}", "loop_control": {"label": "{{ item.client }}"}}]
    plays = [
        {"name": "restic clients", "hosts": ",".join(clients), "become": True, "roles": ["restic"]},
        {"name": "NAS", "hosts": "nas-1", "become": True, "pre_tasks": keys, "roles": ["nas"]},
        {"name": "offsite accounts (fixture)", "hosts": offsite.host, "become": True, "pre_tasks": keys,
         "vars": {"spark_backup_accounts": offsite_accounts,
                  "spark_restic_repositories": [{"name": offsite_name, "path": offsite.path}]},
         "roles": ["nas"]},
    ]
    book = tmp_path_factory.mktemp("play") / "backup.yml"
    book.write_text(yaml.safe_dump(plays, sort_keys=False))
    lab.playbook(book, limit=",".join([*clients, offsite.host]))
    for host in ("pi-1", "nas-1"):
        root = spec.plans[host].paths[0]
        done = lab.exec(host, SOURCE_DATA.format(root=root, host=host))
        assert done.returncode == 0, done.stderr
    # pi-1's source is its hot tier, where the lab's generator writes once site.yml has run: held still, so that
    # the files counted before a backup are the files it saves
    with lab.generator_paused("pi-1"):
        yield fleet


def test_restic_role_installs_keys_and_passwords_0600(lab, backups):
    scratch = backups.backup.drill.scratch_host
    done = lab.exec(scratch, "stat -c '%a %n' /etc/primespark/restic /etc/primespark/restic/*")
    assert done.returncode == 0, done.stderr
    modes = dict(line.split(" ", 1)[::-1] for line in done.stdout.splitlines())
    assert modes["/etc/primespark/restic"] == "700"
    for client in backups.backup.plans:
        assert modes[f"/etc/primespark/restic/backup-{client}.key"] == "600"
    assert modes["/etc/primespark/restic/nas-primary.password"] == "600"


@pytest.fixture
def pi_1_tier_still(lab_flows):
    """pi-1's tier lock held: no scheduled tier pass moves a file out of its hot tier while the test compares
    that tree before and after a backup and its drills."""
    from primespark.orchestration.locks import hold, tier_lock

    with hold(tier_lock("pi-1")):
        yield


def test_backup_copy_drill_end_to_end(lab, backups, pi_1_tier_still):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.backup import backup
    from flows.dr_drill import dr_drill
    from primespark.backup.repositories import folders_on, restic_for
    from primespark.context import FleetContext

    spec = backups.backup
    source_root = spec.plans["pi-1"].paths[0]
    source = sha_tree(lab, "pi-1", source_root)  # regular files; the symlink and *.tmp aside
    assert {"models/v1/weights.bin", "docs/report.pdf", "docs/readme.txt"} <= {p.removeprefix("./") for p in source}
    pi = backup("pi-1", "lab", "ssh", **FAST)
    nas = backup("nas-1", "lab", "ssh", **FAST)
    assert pi["files"] == len(source) and pi["copied_to"] == ["offsite"] and nas["copied_to"] == ["offsite"]
    assert pi["changed_during_backup"] == 0 and pi["manifest_files"] == pi["files"]
    # /srv/hot is listed before /var/lib/primespark/manifests: the manifest is saved inside the data snapshot
    assert pi["manifest_inside_snapshot"] and nas["manifest_inside_snapshot"]
    ctx = FleetContext.load("lab", "ssh")
    # the lab image and the restic role give the hosts python3-xxhash: the manifest is hashed with XXH3-128
    cache = lab.exec("pi-1", f"cat {folders_on(ctx, 'pi-1').cache_file('nas-primary')}")
    assert cache.returncode == 0 and json.loads(cache.stdout)["hash"] == "xxh3_128", cache.stderr
    folder = folders_on(ctx, "pi-1").manifest_dir("nas-primary")
    modes = lab.exec("pi-1", f"stat -c '%a' {folder} {folder}/primespark-manifest.json").stdout.split()
    assert modes == ["700", "600"], modes  # it names every file of the host
    for host, result in (("pi-1", pi), ("nas-1", nas)):
        copied = restic_for(ctx, "offsite", host).snapshots(tags=["primespark-backup"])
        assert result["snapshot"][:8] in [(s.original or "")[:8] for s in copied], f"{host} not offsite"

    row = dr_drill("pi-1", "lab", "ssh", keep_restore=True)
    assert row["result"] == "pass" and row["scratch"] == spec.drill.scratch_host != "pi-1"
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drill-report-pi-1"])))
        history = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drill-history"])))
    assert found and "DR drill PASSED: pi-1 → pi-3" in str(found[-1].data)
    assert history and "pi-1" in json.dumps(history[-1].data)

    # byte for byte: every restored file's sha256 equals the source's (the excluded *.tmp aside)
    restored = lab.exec(spec.drill.scratch_host, "ls -d /var/tmp/primespark-drill/pi-1-* | tail -1").stdout.strip()
    assert sha_tree(lab, "pi-1", source_root) == source  # still: the generator is paused
    assert sha_tree(lab, spec.drill.scratch_host, restored + source_root) == source
    lab.exec(spec.drill.scratch_host, "rm -rf /var/tmp/primespark-drill")

    # the offsite copy on ops-1 alone is enough: the NAS could be gone
    offsite = dr_drill("pi-1", "lab", "ssh", repository="offsite")
    assert offsite["result"] == "pass" and offsite["repository"] == "offsite", offsite
    assert offsite["files"] == len(source), offsite


def test_nas_unreachable_mid_backup_then_next_backup_needs_no_unlock(lab, backups):
    from flows.backup import backup
    from primespark.backup.repositories import restic_for
    from primespark.context import FleetContext

    spec = backups.backup
    nas = backups.hosts["nas-1"]
    pi_address = str(backups.hosts["pi-1"].address)
    root = spec.plans["pi-1"].paths[0]
    assert lab.exec("pi-1", f"head -c 200000000 /dev/urandom > {root}/bulk.bin").returncode == 0
    repo_locks = f"{spec.repositories['nas-primary'].path}/pi-1/repo/locks"
    outcome: dict[str, object] = {}
    # the thread runs in a copy of this context: Prefect's settings (the lab server's URL) live in contextvars
    context = contextvars.copy_context()
    worker = threading.Thread(target=lambda: context.run(lambda: outcome.update(state=backup(
        "pi-1", "lab", "ssh", offsite=False, return_state=True, **FAST))))
    worker.start()
    cut = f"iptables -I INPUT -p tcp --dport {nas.ssh.port} -s {pi_address} -j REJECT --reject-with tcp-reset"
    try:
        deadline = time.monotonic() + 60
        while not lab.exec("nas-1", f"ls {repo_locks}").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lab.exec("nas-1", f"ls {repo_locks}").stdout.strip(), "the backup never took its lock"
        done = lab.exec("nas-1", cut)
        assert done.returncode == 0, done.stderr
        worker.join(timeout=600)
    finally:
        lab.exec("nas-1", cut.replace("-I INPUT", "-D INPUT"))
    state = outcome["state"]
    assert state.is_failed()  # type: ignore[attr-defined]
    reason = str(state.result(raise_on_failure=False))  # type: ignore[attr-defined]
    assert "unreachable" in reason, reason
    assert lab.exec("nas-1", f"ls {repo_locks}").stdout.strip(), "the cut left no stale lock to clear"

    result = backup("pi-1", "lab", "ssh", offsite=False, **FAST)
    assert result["stale_locks_removed"], "the stale lock was not cleared"
    assert not lab.exec("nas-1", f"ls {repo_locks}").stdout.strip()
    ctx = FleetContext.load("lab", "ssh")
    restic_for(ctx, "nas-primary", "pi-1").check()
    lab.exec("pi-1", f"rm -f {root}/bulk.bin")


def test_a_repository_moved_aside_fails_the_backup_and_is_found_again_when_back(lab, backups, prefect):
    """The NAS folder of pi-1's repository moved aside, as an unmounted volume looks: the backup fails naming the
    repository and what to check, on the terminal in a line or two, and makes no repository there; moved back,
    the next backup succeeds and sees the old snapshots."""
    from flows.backup import backup
    from primespark.backup.repositories import restic_for
    from primespark.context import FleetContext

    spec = backups.backup
    backup("pi-1", "lab", "ssh", offsite=False, **FAST)
    ctx = FleetContext.load("lab", "ssh")
    before = {s.id for s in restic_for(ctx, "nas-primary", "pi-1").snapshots(tags=["primespark-backup"])}
    repo = f"{spec.repositories['nas-primary'].path}/pi-1/repo"
    moved = lab.exec("nas-1", f"mv {repo} {repo}.aside")
    assert moved.returncode == 0, moved.stderr
    try:
        state = backup("pi-1", "lab", "ssh", offsite=False, return_state=True, **FAST)
        assert state.is_failed()
        reason = str(state.result(raise_on_failure=False))
        assert "the restic repository of pi-1 in nas-primary is missing" in reason, reason
        assert f"{repo} on nas-1" in reason and "mounted" in reason, reason
        assert "spark backup init nas-primary --client pi-1 --env lab" in reason, reason
        cli = subprocess.run([str(Path(sys.executable).parent / "spark"), "backup", "now", "pi-1", "--env", "lab"],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, **prefect.env()})
        assert cli.returncode == 1 and "is missing" in cli.stderr and "Traceback" not in cli.stdout + cli.stderr, \
            cli.stdout[-2000:] + cli.stderr[-2000:]
        assert lab.exec("nas-1", f"test -e {repo}/config").returncode != 0, "a new repository was made in its place"
    finally:
        lab.exec("nas-1", f"rmdir {repo} 2>/dev/null; mv {repo}.aside {repo}")
    again = backup("pi-1", "lab", "ssh", offsite=False, **FAST)
    assert not again["created_repository"]
    after = {s.id for s in restic_for(ctx, "nas-primary", "pi-1").snapshots(tags=["primespark-backup"])}
    assert before < after and any(i.startswith(again["snapshot"]) for i in after)  # restic 0.14: a short id
