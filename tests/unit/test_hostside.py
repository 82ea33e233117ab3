"""The host-side session: its walk against restic's own list, and the manifest's way into the repository,
with real restic and local repositories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from primespark.backup import hostside
from primespark.backup.session import restore_and_compare, run_session
from primespark.restic import ResticClient

PASSWORD = "not a secret: a test repository"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Files, folders and names that exclude patterns tell apart, a symlink, a FIFO and an empty folder."""
    root = tmp_path / "src"
    for name in ("a.txt", "b.txt", "x.tmp", "abc", "adc", "keep.log", "cache/blob", "cache/deep/more",
                 "logs/app.log", "logs/app.txt", "deep/logs/old.log", "deep/er/logs/z.log", "sub/cache.d/f",
                 "we ird/sp ace.bin", "star*name", "brack[et]"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    (root / "empty").mkdir()
    (root / "link").symlink_to("a.txt")
    (root / "dirlink").symlink_to("cache")
    os.mkfifo(root / "fifo")
    return root


def restic_saves(tmp_path: Path, targets: list[str], excludes: list[str]) -> set[str]:
    repo = tmp_path / f"repo-{len(list(tmp_path.glob('repo-*')))}"
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(repo)}
    subprocess.run(["restic", "init", "--quiet"], env=env, check=True)
    args = [a for pattern in excludes for a in ("--exclude", pattern)]
    out = subprocess.run(["restic", "backup", "-vv", "--json", *args, "--", *targets], env=env, check=True,
                         capture_output=True).stdout
    saved = set()
    for line in out.splitlines():
        message = json.loads(line)
        if message.get("message_type") == "verbose_status" and not message["item"].endswith("/"):
            saved.add(message["item"])
    return saved


@pytest.mark.parametrize("excludes", [
    [],
    ["*.tmp", "cache"],
    ["/SRC/logs", "a?c", "[ab].txt"],
    ["**/logs/*.log", "deep/er", "[^k]*.log", "star\\*name", "brack\\[et\\]"],
    ["*", "!never"],
])
def test_the_walk_lists_the_files_restic_saves(tree: Path, tmp_path: Path, excludes: list[str]) -> None:
    excludes = [e.replace("/SRC", str(tree)) for e in excludes]
    targets = [str(tree), str(tree / "cache"), str(tree / "a.txt")]  # nested targets are saved once
    walked = list(hostside.saved_files(targets, hostside.Excludes(excludes), None))
    assert len(walked) == len(set(walked))
    assert set(walked) == restic_saves(tmp_path, targets, excludes)


def test_patterns_restic_would_refuse_leave_the_decision_to_restic() -> None:
    assert hostside.Excludes(["[]a]"]).unknown and hostside.Excludes(["[a"]).unknown
    assert hostside.Excludes(["trailing\\"]).unknown and not hostside.Excludes(["*.tmp", "[a-c]x"]).unknown


def test_files_restic_saved_that_the_walk_missed_get_a_manifest_of_their_own(tree: Path, tmp_path: Path) -> None:
    """restic saves the whole tree, the walk sees one folder (as when files appear while restic runs): the
    manifest inside the snapshot is not trusted; the one stored beside it covers every file restic saved,
    and the drill compares with that one."""
    client = ResticClient(str(tmp_path / "repo"), PASSWORD)
    client.init()
    folder = str(tmp_path / "manifests")
    data = client.command(*client.backup_args([str(tree)], tags=["primespark-backup", "primespark-run-0001"],
                                              host="pi-1", verbose=True))
    separate = client.command(*client.backup_stdin_args(hostside.MANIFEST_FILE, host="pi-1",
                                                        tags=["primespark-manifest", "primespark-run-0001"]))
    out = run_session(client, "backup", {"data": data, "manifest": separate, "host": "pi-1", "run": "0001",
                                          "cache": None, "manifest_dir": folder, "paths": [str(tree / "cache")],
                                          "excludes": []})
    assert out["returncode"] == 0 and not out["embedded"] and out["manifest"]["returncode"] == 0
    everything = restic_saves(tmp_path, [str(tree)], [])
    assert out["files"] == len(everything) == 16
    stored = json.loads(client.dump(out["manifest"]["summary"]["snapshot_id"], f"/{hostside.MANIFEST_FILE}"))
    assert set(stored["files"]) == everything and stored["snapshot"] == out["summary"]["snapshot_id"]
    inside = json.loads(client.dump(out["summary"]["snapshot_id"], f"{folder}/{hostside.MANIFEST_FILE}"))
    assert set(inside["files"]) == {str(tree / "cache" / "blob"), str(tree / "cache" / "deep" / "more")}

    run = restore_and_compare(client, "pi-1", str(tmp_path / "restored"), manifest_dir=folder)
    assert run.comparison is not None and run.comparison.ok and run.comparison.matched == 16, run


# Stands in front of restic: it starts restic only once the session has hashed every file and put its manifest
# in place, after writing the late file — so the write falls between the hash and restic's read, every time
# (a deadline keeps it from waiting forever).
HOLD_RESTIC = """
i=0
while [ ! -e "$SPARK_TEST_MANIFEST" ]; do
  i=$((i+1)); [ $i -gt 6000 ] && { echo "no manifest after 60 s" >&2; exit 1; }
  sleep 0.01
done
printf 'after, and longer\\n' > "$SPARK_TEST_LATE"
exec "$@"
"""


def test_a_file_written_after_its_hash_and_before_restic_read_it_is_counted_not_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash comes first, restic's read later: a write in between makes restic's copy another version. The
    session sees the file's identity move, stores a manifest that counts the file as changed, and the drill
    passes without comparing it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-big.bin").write_bytes(os.urandom(1_000_000))
    late = src / "z.txt"
    late.write_text("before\n")
    client = ResticClient(str(tmp_path / "repo"), PASSWORD)
    client.init()
    folder = tmp_path / "manifests"
    monkeypatch.setenv("SPARK_TEST_MANIFEST", str(folder / hostside.MANIFEST_FILE))  # the session's environment
    monkeypatch.setenv("SPARK_TEST_LATE", str(late))
    data = ["sh", "-c", HOLD_RESTIC, "sh", *client.command(*client.backup_args(
        [str(src)], tags=["primespark-backup", "primespark-run-0002"], host="pi-1", verbose=True))]
    separate = client.command(*client.backup_stdin_args(hostside.MANIFEST_FILE, host="pi-1",
                                                        tags=["primespark-manifest", "primespark-run-0002"]))
    out = run_session(client, "backup", {"data": data, "manifest": separate, "host": "pi-1", "run": "0002",
                                          "cache": None, "manifest_dir": str(folder), "paths": [str(src)],
                                          "excludes": []})
    assert out["returncode"] == 0 and not out["embedded"] and out["changed_during_backup"] == [str(late)], out
    assert client.dump(out["summary"]["snapshot_id"], str(late)) == b"after, and longer\n"  # restic read it so
    run = restore_and_compare(client, "pi-1", str(tmp_path / "restored"), manifest_dir=str(folder))
    assert run.comparison is not None and run.comparison.ok, run
    assert run.comparison.changed_during_backup == [str(late)] and run.comparison.matched == 1


def test_a_session_whose_controller_goes_ends_its_restic_and_saves_no_snapshot(tmp_path: Path) -> None:
    """The controller's end of the session's stdout closed (its SSH session gone: a worker killed mid-backup):
    the session interrupts restic, which saves no snapshot, and exits with CONTROLLER_GONE, no restic left behind.
    restic is slowed to 1 KiB/s so that it is still writing its first pack when the controller goes. (Its lock is
    not checked: a throttled restic on a loaded machine sometimes outlives the grace and is killed, lock and all —
    a lock restic itself finds stale, its process gone from the same host.)"""
    source = tmp_path / "data"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(1 << 20))
    client = ResticClient(str(tmp_path / "repo"), PASSWORD)
    client.init()
    data = [*client.command("--limit-upload", "1"),
            *client.backup_args([str(source)], tags=["primespark-backup"], host="pi-1", verbose=True)]
    session = subprocess.Popen([sys.executable, hostside.__file__, "backup"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env={**os.environ, **client.environment()})
    assert session.stdin is not None and session.stdout is not None
    session.stdin.write(json.dumps({"data": data, "host": "pi-1", "run": "0003", "cache": None,
                                    "manifest_dir": None, "paths": [str(source)], "excludes": []}).encode())
    session.stdin.close()
    packs, repository = tmp_path / "repo" / "data", str(tmp_path / "repo")
    deadline = time.monotonic() + 60
    # restic writes its first pack (its lock taken and registered long before: a SIGINT in the instant between
    # restic writing its lock file and registering it leaves the file behind, restic's own race)
    while not any(path.is_file() for path in packs.rglob("*")):
        assert session.poll() is None and time.monotonic() < deadline, "restic never started writing"
        time.sleep(0.05)
    session.stdout.close()
    assert session.wait(timeout=60) == hostside.CONTROLLER_GONE
    assert client.snapshots() == []
    assert not [pid for pid in processes_naming(repository) if pid != os.getpid()], "restic left running"


def processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_hashing_a_file_for_the_manifest_does_not_make_it_look_used(tmp_path: Path) -> None:
    old = time.time() - 3 * 86400  # three days unused: the tier policy, which reads access times, would move it
    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"probe")
    os.utime(probe, (old, old))
    probe.read_bytes()
    if probe.stat().st_atime == pytest.approx(old, abs=1):
        pytest.skip("this filesystem does not update access times on reads (mounted noatime)")
    reading = tmp_path / "reading.bin"
    reading.write_bytes(os.urandom(4096))
    os.utime(reading, (old, old))

    entry = hostside.digest(str(reading))

    assert entry is not None and entry.size == 4096
    assert reading.stat().st_atime == pytest.approx(old, abs=1), "the backup's hashing counted as a use"
