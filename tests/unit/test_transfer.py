"""The transfer engine (primespark.data.transfer): real rsync, through rrsync as the sync accounts run it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import xxhash
from rrsync_testing import forced_route, gate_without_xxhash

from primespark.data import transfer
from primespark.data.transfer import TransferFailed, TransferPlan
from primespark.hosts import LocalRunner

RUNNER = LocalRunner("pi-1")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    source, destination = tmp_path / "source", tmp_path / "destination"
    (source / "readings" / "2026").mkdir(parents=True)
    destination.mkdir()
    for i in range(5):
        (source / "readings" / "2026" / f"r{i}.json").write_text(f'{{"value": {i}}}\n')
    (source / "blob.bin").write_bytes(os.urandom(200_000))
    (source / "name with spaces and ünïcode.txt").write_text("odd names travel too\n")
    (source / "draft.tmp").write_text("excluded")
    return source, destination


def test_a_copy_sends_what_is_new_then_nothing(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    source, destination = folders
    plan = TransferPlan(str(source), "/", forced_route(tmp_path, destination, "-wo", "-no-del"), exclude=("*.tmp",))
    first = transfer.run(RUNNER, plan)
    assert first.files_sent == 7 and first.source_files == 7 and first.skipped == 0
    assert first.bytes_sent > 200_000 and first.literal_bytes >= 200_000
    assert "name with spaces and ünïcode.txt" in {i.path for i in first.sent}
    # each file's sum as the sender read it (the one its receiver checked the copy against): XXH3-128
    assert {i.path: i.checksum for i in first.sent} == \
        {i.path: xxhash.xxh3_128((source / i.path).read_bytes()).hexdigest() for i in first.sent}
    expected = {k: v for k, v in tree(source).items() if not k.endswith(".tmp")}
    assert tree(destination) == expected
    again = transfer.run(RUNNER, plan)
    assert again.files_sent == 0 and again.skipped == 7 and again.bytes_sent < 2_000
    # what the watcher reports: only those paths are looked at; one that vanished meanwhile is no error
    (source / "readings" / "2026" / "r1.json").write_text('{"value": 100}\n')
    listed = transfer.run(RUNNER, transfer.with_files(plan, ["readings/2026/r1.json", "gone.json"]))
    assert [i.path for i in listed.sent] == ["readings/2026/r1.json"]
    assert (destination / "readings" / "2026" / "r1.json").read_text() == '{"value": 100}\n'


def test_a_copy_account_refuses_to_delete(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    source, destination = folders
    route = forced_route(tmp_path, destination, "-wo", "-no-del")
    transfer.run(RUNNER, TransferPlan(str(source), "/", route))
    (source / "blob.bin").unlink()
    with pytest.raises(TransferFailed) as refused:
        transfer.run(RUNNER, TransferPlan(str(source), "/", route, delete=True, max_delete=0))
    assert "refused" in refused.value.message and not refused.value.transient
    assert (destination / "blob.bin").exists()


def test_a_mirror_counts_deletions_before_making_any(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    source, destination = folders
    route = forced_route(tmp_path, destination, "-wo")
    transfer.run(RUNNER, TransferPlan(str(source), "/", route))
    for i in range(3):
        (source / "readings" / "2026" / f"r{i}.json").unlink()
    counted = transfer.run(RUNNER, TransferPlan(str(source), "/", route, delete=True, max_delete=0),
                           accept=(transfer.MAX_DELETE_REACHED,))
    assert counted.deletions_held_back == 3 and counted.deleted == []
    assert len(list((destination / "readings" / "2026").iterdir())) == 5
    listing = transfer.run(RUNNER, TransferPlan(str(source), "/", route, delete=True, deletions_only=True,
                                                dry_run=True))
    assert sorted(listing.deleted) == [f"readings/2026/r{i}.json" for i in range(3)]
    assert len(list((destination / "readings" / "2026").iterdir())) == 5
    done = transfer.run(RUNNER, TransferPlan(str(source), "/", route, delete=True, deletions_only=True,
                                             max_delete=3))
    assert sorted(done.deleted) == sorted(listing.deleted) and done.files_sent == 0
    assert sorted(p.name for p in (destination / "readings" / "2026").iterdir()) == ["r3.json", "r4.json"]


def test_a_killed_transfer_leaves_no_partial_file_and_resumes(tmp_path: Path) -> None:
    source, destination = tmp_path / "source", tmp_path / "destination"
    source.mkdir()
    destination.mkdir()
    big = source / "weights.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    plan = TransferPlan(str(source), "/", forced_route(tmp_path, destination, "-wo", "-no-del"), bwlimit_kib=3072)
    rsync = subprocess.Popen(["rsync", *plan.argv()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = destination / transfer.PARTIAL_DIR / "weights.bin"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(p.stat().st_size > 3 << 20 for p in destination.glob(".weights*")):
        time.sleep(0.05)
    os.kill(rsync.pid, signal.SIGKILL)
    rsync.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not partial.exists():
        time.sleep(0.05)
    deadline = time.monotonic() + 10  # the receiver ends on its own once its sender is gone (and rrsync's lock)
    while time.monotonic() < deadline and any(str(destination) in cmdline for cmdline in _commands("rrsync")):
        time.sleep(0.05)
    assert not (destination / "weights.bin").exists(), "a partial file under its final name"
    assert partial.exists(), f"the partial file was not kept: {list(destination.rglob('*'))}"
    had = partial.stat().st_size
    assert 0 < had < big.stat().st_size
    resumed = transfer.run(RUNNER, TransferPlan(str(source), "/", plan.route))
    assert (destination / "weights.bin").read_bytes() == big.read_bytes()
    assert not partial.exists()
    # only what was missing went as data; the rest matched the partial copy
    assert resumed.literal_bytes <= big.stat().st_size - had + 256 * 1024, (resumed.stats, had)
    assert resumed.stats["matched"] >= had - 256 * 1024


class RecordingRunner(LocalRunner):
    """This machine, keeping each command's arguments and standard input."""

    def __init__(self) -> None:
        super().__init__("pi-1")
        self.commands: list[tuple[list[str], bytes | None]] = []

    def run(self, argv: Sequence[str], **options: Any) -> Any:
        self.commands.append((list(argv), options.get("stdin")))
        return super().run(argv, **options)

    def stream(self, argv: Sequence[str], **options: Any) -> Any:  # how rsync runs: its lines read as they come
        self.commands.append((list(argv), options.get("stdin")))
        return super().stream(argv, **options)


def test_only_files_worth_resuming_wait_in_the_partial_folder(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    """--delay-updates (what lets a cut-off file resume) costs rsync a dozen opens per file: the small files go in a
    run without it, which lists the large ones for a second run with it. One report for both; deletions once."""
    source, destination = folders
    big = source / "models" / "weights.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(transfer.RESUMABLE_BYTES + 1))
    (destination / "old.json").write_text("gone at the source")
    runner = RecordingRunner()
    plan = TransferPlan(str(source), "/", forced_route(tmp_path, destination, "-wo"), delete=True)
    report = transfer.run(runner, plan)
    assert tree(destination) == tree(source)
    assert report.plan == plan and report.files_sent == 9 and report.source_files == 9 and report.skipped == 0
    assert report.deleted == ["old.json"] and report.oversized == []
    assert {i.path for i in report.sent if i.size > transfer.RESUMABLE_BYTES} == {"models/weights.bin"}
    small_run, large_run = runner.commands
    assert f"--max-size={transfer.RESUMABLE_BYTES - 1}" in small_run[0] and "--delay-updates" not in small_run[0]
    assert "--delete-during" in small_run[0] and small_run[1] is None
    assert "--delay-updates" in large_run[0] and "--delete-during" not in large_run[0]
    assert large_run[1] == b"models/weights.bin"  # only what the first run left
    # nothing changed: the second run still looks at the large file (and sends nothing)
    again = transfer.run(runner, plan)
    assert again.files_sent == 0 and again.skipped == 9 and len(runner.commands) == 4
    # a dry run writes nothing: one run says it all
    transfer.run(runner, TransferPlan(str(source), "/", plan.route, dry_run=True))
    assert len(runner.commands) == 5 and "--max-size" not in " ".join(runner.commands[-1][0])


def test_a_long_transfer_says_how_far_it_is(tmp_path: Path, folders: tuple[Path, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each item read as rsync prints it: what was sent so far goes to `progress` (every PROGRESS_SECONDS; here
    at every line), the second run's figures after the first's, and the last agrees with the report."""
    source, destination = folders
    big = source / "models" / "weights.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(transfer.RESUMABLE_BYTES + 1))
    monkeypatch.setattr(transfer, "PROGRESS_SECONDS", 0.0)
    heard: list[transfer.Progress] = []
    plan = TransferPlan(str(source), "/", forced_route(tmp_path, destination, "-wo"))
    report = transfer.run(RecordingRunner(), plan, progress=heard.append)
    assert report.files_sent == 9 and tree(destination) == tree(source)
    counts = [p.files for p in heard]
    assert counts == sorted(counts) and set(counts) - {0} == set(range(1, 10)), counts  # each file, as it went
    assert heard[-1].files == report.files_sent and heard[-1].bytes == sum(i.size for i in report.sent)
    assert heard[-1].bytes > transfer.RESUMABLE_BYTES, "the large file's run counts on from the first run's"
    assert all(a.seconds <= b.seconds for a, b in itertools.pairwise(heard))
    heard.clear()
    assert transfer.run(RecordingRunner(), plan, progress=heard.append).files_sent == 0
    assert {p.files for p in heard} <= {0}, "nothing sent: nothing counted"


def test_the_files_a_max_size_run_left_are_read_back() -> None:
    out = ("big\\#012nl is over max-size\n"
           "<f+++++++++|5|5|2026/12/04-10:54:42|9175a3e5927baafbb3ab883e43f40a27|x is over max-size\n"
           "a/big one.bin is over max-size\n")
    assert transfer.parse_oversized(out) == ["big\nnl", "a/big one.bin"]


def _commands(name: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if name in cmdline:
            found.append(cmdline)
    return found


def test_a_sync_key_may_flush_its_folder_and_run_nothing_else(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    _, destination = folders
    route = forced_route(tmp_path, destination, "-wo", "-no-del")
    boot = Path(transfer.BOOT_ID).read_text().strip()
    assert transfer.flush(RUNNER, route, "/", timeout=60) == boot, "through the gate: syncfs, then the boot id"
    assert transfer.flush(RUNNER, transfer.local_route(), str(destination), timeout=60) == boot
    # the gate passes any other request to rrsync, which refuses it (the lab test tries a shell over real ssh)
    other = RUNNER.run([*route.rsh, route.target, "cat /proc/sys/kernel/random/boot_id"], timeout=60)
    assert other.returncode != 0 and boot not in other.text, other.text + other.stderr
    # a local folder not made yet (the first transfer makes it): its parent's filesystem
    assert transfer.flush(RUNNER, transfer.local_route(), str(tmp_path / "not" / "yet"), timeout=60) == boot
    with pytest.raises(TransferFailed, match="cannot flush"):
        transfer.flush(RUNNER, forced_route(tmp_path, tmp_path / "gone", "-wo"), "/", timeout=60)


def test_a_sync_key_may_hash_its_copies_and_nothing_outside_its_folder(
        tmp_path: Path, folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    source, destination = folders
    route = forced_route(tmp_path, destination, "-wo", "-no-del")
    sent = sorted(transfer.run(RUNNER, TransferPlan(str(source), "/", route, exclude=("*.tmp",))).sent,
                  key=lambda i: i.path)
    (destination / "outside").symlink_to(source / "blob.bin")  # a link out of the folder is never followed
    changed = b'{"value": "changed at the destination"}\n'
    (destination / "readings" / "2026" / "r0.json").write_bytes(changed)
    asked = [i.path for i in sent] + ["gone.json", "outside", "readings"]

    copies = transfer.hash_copies(RUNNER, route, asked, timeout=60)

    assert copies is not None
    assert dict(zip(asked, copies.copies, strict=True)) == {
        **{i.path: (i.size, i.checksum) for i in sent if i.path != "readings/2026/r0.json"},
        "readings/2026/r0.json": (len(changed), xxhash.xxh3_128(changed).hexdigest()),
        "gone.json": None, "outside": None, "readings": None}
    flushed = transfer.hash_copies(RUNNER, route, asked, timeout=60, flush=True)
    assert flushed is not None and flushed.copies == copies.copies
    assert flushed.boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip() and copies.boot is None
    with pytest.raises(TransferFailed, match="cannot read back"):
        transfer.hash_copies(RUNNER, route, ["readings/../../source/blob.bin"], timeout=60)
    bare = forced_route(gate_without_xxhash(tmp_path, monkeypatch), destination, "-wo", "-no-del")
    assert transfer.hash_copies(RUNNER, bare, asked, timeout=60) is None, "no hasher there: the caller uses rsync"


def test_the_bandwidth_limit_holds(tmp_path: Path) -> None:
    source, destination = tmp_path / "source", tmp_path / "destination"
    source.mkdir()
    destination.mkdir()
    (source / "frames.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    plan = TransferPlan(str(source), "/", forced_route(tmp_path, destination, "-wo", "-no-del"),
                        bwlimit_kib=transfer.rate_kib("1M"))
    done = transfer.run(RUNNER, plan)
    rate = done.literal_bytes / done.seconds
    assert 0.8 * 1024 * 1024 <= rate <= 1.2 * 1024 * 1024, f"{rate / 1024:.0f} KiB/s over {done.seconds:.2f} s"


def test_verification_finds_a_copy_whose_content_differs(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    source, destination = folders
    route = forced_route(tmp_path, destination, "-wo", "-no-del")
    sent = transfer.run(RUNNER, TransferPlan(str(source), "/", route)).sent
    copy = destination / "blob.bin"
    stat = copy.stat()
    data = bytearray(copy.read_bytes())
    data[1000] ^= 0xFF  # one flipped byte, same size and time: invisible to rsync's quick check
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (source / "readings" / "2026" / "r0.json").write_text('{"value": "changed since"}\n')
    check = transfer.run(RUNNER, TransferPlan(str(source), "/", route, checksum=True, dry_run=True,
                                              files=tuple(i.path for i in sent)))
    assert [i.path for i in check.sent if i.content_differs] == ["blob.bin"]
    assert [i.path for i in check.sent if not i.content_differs] == ["readings/2026/r0.json"]
    assert copy.read_bytes() == bytes(data), "a dry run changed the destination"


def test_rates_and_the_command_line() -> None:
    assert transfer.rate_kib("2M") == 2048 and transfer.rate_kib("500K") == 500 and transfer.rate_kib("500") == 500
    assert transfer.rate_kib("1.5G") == 1536 * 1024 and transfer.rate_kib("off") is None
    with pytest.raises(ValueError):
        transfer.rate_kib("pause")
    argv = TransferPlan("/srv/hot", "/", transfer.ssh_route("sync-job", "10.99.0.3", 2222, "/k", "/kh")).argv()
    assert "--delay-updates" in argv and "--fsync" in argv and "--inplace" not in argv and "--partial" not in argv
    assert "--delay-updates" not in TransferPlan("/srv/hot", "/staging/", delay_updates=False).argv()
    assert argv[-2:] == ["/srv/hot/", "sync-job@10.99.0.3:/"]
    assert "ssh -p 2222 -i /k -o IdentitiesOnly=yes" in argv[argv.index("-e") + 1]
    assert "ControlPath" not in argv[argv.index("-e") + 1]
    # a pass's sessions to one account share a connection, its socket beside the key (`%C`: 40 hex digits)
    shared = transfer.ssh_route("sync-job", "10.99.0.3", 2222, "/k", "/kh", shared_dir="/etc/primespark/sync").rsh
    assert "ControlPath=/etc/primespark/sync/cm-%C" in shared and "ControlMaster=auto" in shared
    too_long = transfer.ssh_route("sync-job", "10.99.0.3", 2222, "/k", "/kh", shared_dir="/" + "d" * 70).rsh
    assert not any(option.startswith("Control") for option in too_long), "a socket path over the limit: no sharing"


def test_the_itemized_lines_are_read_field_by_field() -> None:
    out = ("<f+++++++++|5120|5188|2026/12/04-10:54:42|9175a3e5927baafbb3ab883e43f40a27|cam/a|b.jpg\n"
           "cd+++++++++|4096|0|2026/02/30-00:00:00|                                |cam/\n"
           "*deleting  |0|0||                                |old.jpg\n")
    sent, folder, deleted = transfer.parse_items(out)
    assert (sent.path, sent.size, sent.wire_bytes, sent.checksum) == ("cam/a|b.jpg", 5120, 5188,
                                                                      "9175a3e5927baafbb3ab883e43f40a27")
    assert sent.mtime == datetime(2026, 12, 4, 10, 54, 42, tzinfo=UTC) and sent.sent and sent.new
    assert folder.mtime is None and folder.checksum == "" and not folder.sent  # no such day: no time, no error
    assert deleted.deleted and deleted.path == "old.jpg"


def test_a_destination_that_does_not_answer_is_a_transient_failure(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    source, _ = folders
    refused = "echo 'ssh: connect: Connection refused' >&2; exit 255"
    route = transfer.Route("sync-test@destination", ("sh", "-c", refused))
    with pytest.raises(TransferFailed) as failed:
        transfer.run(RUNNER, TransferPlan(str(source), "/", route))
    assert failed.value.transient and failed.value.returncode in (12, 255), failed.value


def _reads_update_access_times(folder: Path) -> bool:
    """Whether a read of a file in `folder` moves its access time (relatime: when it is older than a day)."""
    probe = folder / "atime-probe"
    probe.write_bytes(b"probe")
    os.utime(probe, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    before = probe.stat().st_atime_ns
    probe.read_bytes()
    moved = probe.stat().st_atime_ns != before
    probe.unlink()
    return moved


def test_sending_and_comparing_a_file_do_not_make_it_look_used(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    source, destination = folders
    if not _reads_update_access_times(source):
        pytest.skip("this filesystem does not update access times on reads (mounted noatime)")
    old = time.time() - 3 * 86400  # three days unused: the tier policy would move it
    blob = source / "blob.bin"
    os.utime(blob, (old, old))
    route = forced_route(tmp_path, destination, "-wo", "-no-del")

    sent = transfer.run(RUNNER, TransferPlan(str(source), "/", route)).sent
    transfer.run(RUNNER, TransferPlan(str(source), "/", route, checksum=True, dry_run=True,
                                      files=tuple(i.path for i in sent)))

    assert blob.stat().st_atime == pytest.approx(old, abs=1), "rsync's read counted as a use of the file"
    assert "blob.bin" in {i.path for i in sent} and (destination / "blob.bin").read_bytes() == blob.read_bytes()


def test_sizes_read_as_a_person_reads_them() -> None:
    assert [transfer.human_size(n) for n in (0, 512, 1536, 2_582_420_796, 8 * 10**12)] == \
        ["0 B", "512 B", "1.5 KiB", "2.4 GiB", "7.3 TiB"]
    assert transfer.Progress(3, 3 << 20, 2.0).text == "3 files, 3.0 MiB sent in 2 s (1.5 MiB/s)"
