"""Sync end to end in the lab: every Pi's hot tier copied to the NAS over the edge LAN, the NAS's warm tier mirrored
to analytics-1 over the WireGuard mesh (the edge is behind NAT), through the jobs' rrsync-confined accounts,
with the data generator writing on the Pis all along.

Set-up: the wireguard role on nas-1 and analytics-1 (the mirror crosses sites over the overlay), the sync role
on the sources and destinations, the lab_generator role on the Pis — as site.yml applies them.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.lab
FAST = {"retries": 1, "retry_delay_seconds": 1.0}
PIS = ("pi-1", "pi-2", "pi-3")
SYNC_KEY = "-i /etc/primespark/sync/id_ed25519 -o IdentitiesOnly=yes -o BatchMode=yes " \
           "-o UserKnownHostsFile=/etc/primespark/sync/known_hosts -o StrictHostKeyChecking=yes"

# Inside a lab host: write `count` files into `root` evenly over `seconds`; print each one's name and time.
WRITER = r"""
import json, os, random, sys, time
root, count, seconds, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
os.makedirs(root, exist_ok=True)
start = time.time()
for i in range(count):
    time.sleep(max(0.0, start + i * seconds / count - time.time()))
    name = f"f{seed}-{i:03d}.bin"
    with open(os.path.join(root, name), "wb") as handle:
        handle.write(os.urandom(rng.randint(200, 20000)))
    print(json.dumps({"name": name, "t": time.time()}), flush=True)
"""

# Inside a lab host: watch folders by listing them every 0.2 s; print when each file was first seen.
POLLER = r"""
import json, os, sys, time
roots, expected, timeout = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
seen, deadline = {}, time.time() + timeout
while time.time() < deadline and len(seen) < expected:
    now = time.time()
    for root in roots:
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith(".") and name not in seen:
                seen[name] = now
    time.sleep(0.2)
print(json.dumps(seen))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sha_tree(lab: Any, host: str, root: str) -> dict[str, str]:
    done = lab.exec(host, f"cd {root} && find . -type f ! -path '*/.~tmp~/*' -print0 | sort -z | xargs -0 -r sha256sum")
    assert done.returncode == 0, done.stderr
    return {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in done.stdout.splitlines()}


def count_files(lab: Any, host: str, root: str) -> int:
    done = lab.exec(host, f"find {root} -type f ! -path '*/.~tmp~/*' | wc -l")
    return int(done.stdout.strip())


@pytest.fixture(scope="module")
def synced(lab, lab_flows, configured, tmp_path_factory):
    """The sync plays on top of site.yml (`configured`: the hosts' tiers exist, a watcher needs its folder)."""
    fleet = lab.fleet
    plays = [
        {"name": "mesh between the NAS and the cloud", "hosts": "nas-1,analytics-1", "become": True,
         "roles": ["wireguard"]},
        {"name": "sync transport", "hosts": ",".join([*PIS, "nas-1", "analytics-1"]), "become": True,
         "roles": ["sync"]},
        {"name": "lab data", "hosts": ",".join(PIS), "become": True, "roles": ["lab_generator"]},
    ]
    book = tmp_path_factory.mktemp("play") / "sync.yml"
    book.write_text(yaml.safe_dump(plays, sort_keys=False))
    lab.playbook(book, limit=",".join([*PIS, "nas-1", "analytics-1"]))
    again = lab.playbook(book, limit=",".join([*PIS, "nas-1", "analytics-1"]))
    assert again.changed_tasks == [], again.changed_tasks
    # lab_flows: this process reports to the lab's Prefect server on ops-1 (with its auth string). A slot held
    # by a run killed in an earlier session would block every pass: this session owns the lab.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    from primespark.data.layout import links
    from primespark.orchestration.locks import sync_lock

    with get_client(sync_client=True) as client:
        for link in links(fleet):
            with contextlib.suppress(ObjectNotFound):
                client.update_global_concurrency_limit(sync_lock(link.job, link.source),
                                                       GlobalConcurrencyLimitUpdate(active_slots=0))
    yield fleet


def test_the_generator_writes_readings_and_blobs_on_every_pi(lab, synced):
    deadline = time.monotonic() + 150  # cron starts it at the next minute
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = {pi: count_files(lab, pi, "/srv/hot/lab-data/readings") for pi in PIS}
        if all(n >= 3 for n in counts.values()):
            break
        time.sleep(3)
    assert all(n >= 3 for n in counts.values()), counts
    assert lab.exec("pi-1", "test -f /etc/cron.d/spark-lab-generator").returncode == 0


def test_the_sync_accounts_are_confined_to_their_folders(lab, synced):
    nas = str(synced.hosts["nas-1"].address)
    shell = lab.exec("pi-1", f"ssh {SYNC_KEY} sync-hot-to-nas@{nas} id")
    assert shell.returncode != 0 and "does not run rsync" in shell.stderr, shell.stdout + shell.stderr
    escape = lab.exec("pi-1", f"rsync -a -e 'ssh {SYNC_KEY}' /etc/hostname sync-hot-to-nas@{nas}:../pi-2/")
    assert escape.returncode != 0 and "do not use .." in escape.stderr, escape.stderr
    delete = lab.exec("pi-1", f"mkdir -p /tmp/empty && rsync -a --delete -e 'ssh {SYNC_KEY}' /tmp/empty/ "
                              f"sync-hot-to-nas@{nas}:/")
    assert delete.returncode != 0 and "has been disabled on this server" in delete.stderr, delete.stderr
    # one of the two other requests the gate lets a key make: flush its folder's filesystem, answered with the boot id
    flushed = lab.exec("pi-1", f"ssh {SYNC_KEY} sync-hot-to-nas@{nas} primespark-flush")
    boot = lab.exec("nas-1", "cat /proc/sys/kernel/random/boot_id").stdout.strip()
    assert flushed.returncode == 0 and boot and flushed.stdout.strip() == boot, flushed.stdout + flushed.stderr
    # and pi-1's key lands in pi-1's own folder, owned by the job's account
    lab.exec("pi-1", f"echo confined > /tmp/probe.txt && rsync -a -e 'ssh {SYNC_KEY}' /tmp/probe.txt "
                     f"sync-hot-to-nas@{nas}:/")
    # the verification's request: the copies' sizes and hashes as nas-1 reads them, only below the key's folder
    hashed = lab.exec("pi-1", f"printf 'probe.txt\\0gone.txt\\0' | ssh {SYNC_KEY} sync-hot-to-nas@{nas} "
                              "primespark-hash")
    expected = xxhash.xxh3_128(b"confined\n").hexdigest()
    assert hashed.returncode == 0 and hashed.stdout.splitlines() == [f"9 {expected}", "-"], \
        hashed.stdout + hashed.stderr
    flushed_too = lab.exec("pi-1", f"printf 'probe.txt\\0' | ssh {SYNC_KEY} sync-hot-to-nas@{nas} "
                                   "primespark-hash-flush")
    assert flushed_too.stdout.splitlines() == [f"9 {expected}", boot], flushed_too.stdout + flushed_too.stderr
    outside = lab.exec("pi-1", f"printf '../pi-2/x' | ssh {SYNC_KEY} sync-hot-to-nas@{nas} primespark-hash")
    assert outside.returncode != 0 and "not a file below the folder" in outside.stderr, outside.stderr
    owner = lab.exec("nas-1", "stat -c %U /srv/warm/pi-1/probe.txt && rm /srv/warm/pi-1/probe.txt")
    assert owner.stdout.strip() == "sync-hot-to-nas", owner.stdout + owner.stderr


def _links_synced_since(lab, since: float) -> bool:
    from primespark.context import FleetContext
    from primespark.data import sync as core
    from primespark.data.layout import links

    ctx = FleetContext.load("lab", "ssh")
    return all((core.load_state(ctx, link).last_success or 0) > since for link in links(ctx.fleet))


def test_continuous_copy_then_mirror_carry_200_files_within_30_s(lab, synced):
    from flows.sync import sync_watch

    started = time.time()
    outcomes: dict[str, Any] = {}
    threads = []
    for job in ("hot-to-nas", "warm-to-cloud"):  # 240 s at most: cancelled once the files are in (below)
        context = contextvars.copy_context()
        thread = threading.Thread(target=lambda job=job, context=context: context.run(
            lambda: outcomes.update({job: sync_watch(job, "lab", "ssh", duration_seconds=240, state_check_seconds=2,
                                                     return_state=True, **FAST)})))
        thread.start()
        threads.append(thread)
    try:
        deadline = time.monotonic() + 120  # watchers ready and the first, full passes done on every link
        while not _links_synced_since(lab, started):
            assert time.monotonic() < deadline, "the first full passes did not finish in 120 s"
            time.sleep(2)
        per_pi = {"pi-1": 67, "pi-2": 67, "pi-3": 66}
        nas_roots = [f"/srv/warm/{pi}/sync-test" for pi in PIS]
        cloud_roots = [f"/srv/datasets/edge/{pi}/sync-test" for pi in PIS]
        pollers = {host: lab_popen(lab, host, ["python3", "-c", POLLER, json.dumps(roots), "200", "150"])
                   for host, roots in (("nas-1", nas_roots), ("analytics-1", cloud_roots))}
        writers = {pi: lab_popen(lab, pi, ["python3", "-c", WRITER, "/srv/hot/sync-test", str(n), "60", pi[-1]])
                   for pi, n in per_pi.items()}
        written = {}
        for writer in writers.values():
            out, err = writer.communicate(timeout=120)
            assert writer.returncode == 0, err
            written.update({json.loads(line)["name"]: json.loads(line)["t"] for line in out.splitlines()})
        seen = {}
        for host, poller in pollers.items():
            out, err = poller.communicate(timeout=240)
            assert poller.returncode == 0, err
            seen[host] = json.loads(out)
    finally:
        _cancel_watch_runs(since=started)  # as from the UI: each watch stops within its state check
        for thread in threads:
            thread.join(timeout=600)
    assert len(written) == 200
    for host in ("nas-1", "analytics-1"):
        missing = sorted(set(written) - set(seen[host]))
        assert not missing, f"{len(missing)} files never reached {host}: {missing[:5]}"
    lags = {host: [seen[host][name] - written[name] for name in written] for host in seen}
    for host, values in lags.items():
        print(f"lag to {host}: p50 {statistics.median(values):.1f} s, p95 {percentile(values, 0.95):.1f} s, "
              f"max {max(values):.1f} s over {len(values)} files")
    assert percentile(lags["nas-1"], 0.95) <= 30 and percentile(lags["analytics-1"], 0.95) <= 30, lags
    for pi in PIS:
        source = sha_tree(lab, pi, "/srv/hot/sync-test")
        assert sha_tree(lab, "nas-1", f"/srv/warm/{pi}/sync-test") == source
        assert sha_tree(lab, "analytics-1", f"/srv/datasets/edge/{pi}/sync-test") == source
    results = {job: state.result(raise_on_failure=False) for job, state in outcomes.items()}
    for job, state in outcomes.items():
        assert state.is_cancelled(), (job, state)  # it ran until cancelled, not until it failed
        assert results[job]["failed"] == 0 and results[job]["refused"] == 0, (job, results[job])
    print("passes:", results)


def _cancel_watch_runs(since: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    running = FlowRunFilter(name=FlowRunFilterName(like_="sync-watch-"),
                            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=running):
            if run.start_time is not None and run.start_time.timestamp() >= since - 5:  # this test's, not a worker's
                client.set_flow_run_state(run.id, Cancelling(), force=True)


def lab_popen(lab, host: str, argv: list[str]):  # type: ignore[no-untyped-def]
    import subprocess

    return subprocess.Popen(["docker", "exec", lab.container(host), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _in_thread(fn):  # type: ignore[no-untyped-def]
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()
    thread = threading.Thread(target=lambda: context.run(lambda: outcome.update(state=fn())))
    thread.start()
    return thread, outcome


def test_a_killed_run_leaves_no_partial_file_and_the_next_sends_only_the_rest(lab, synced):
    from flows.sync import sync

    with lab.generator_paused("pi-1"):
        sync("hot-to-nas", "lab", "ssh", source="pi-1", **FAST)  # caught up: only the big file is new below
        size = 64 * 1024 * 1024
        assert lab.exec("pi-1", f"mkdir -p /srv/hot/big && head -c {size} /dev/urandom > /srv/hot/big/weights.bin"
                        ).returncode == 0
        thread, outcome = _in_thread(lambda: sync("hot-to-nas", "lab", "ssh", source="pi-1", bwlimit="4M",
                                                  return_state=True, **FAST))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sizes = lab.exec("nas-1", "stat -c %s /srv/warm/pi-1/big/.weights.bin.* 2>/dev/null").stdout.split()
            if sizes and int(sizes[0]) > 8 * 1024 * 1024:
                break
            time.sleep(0.3)
        pids = lab.exec("pi-1", "pgrep -x rsync").stdout.split()
        assert pids, "no rsync running on pi-1 mid-transfer"
        assert lab.exec("pi-1", f"kill -9 {' '.join(pids)}").returncode == 0
        thread.join(timeout=300)
        assert outcome["state"].is_failed(), "the killed run did not fail"
        deadline = time.monotonic() + 30  # the receiver ends once its sender is gone, saving the partial file
        while lab.exec("nas-1", "pgrep -u sync-hot-to-nas").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert lab.exec("nas-1", "test -e /srv/warm/pi-1/big/weights.bin").returncode != 0, \
            "a partial file under its final name"
        partial = lab.exec("nas-1", "stat -c %s /srv/warm/pi-1/big/.~tmp~/weights.bin")
        assert partial.returncode == 0, "the partial file was not kept for the next run"
        had = int(partial.stdout)
        result = sync("hot-to-nas", "lab", "ssh", source="pi-1", **FAST)
        [link] = result["links"]
        print(f"in flight: {size} bytes, {had} already at the NAS; the next run sent {link['bytes_sent']} bytes "
              f"({link['literal_bytes']} as data, {link['files_sent']} file(s))")
        assert link["files_sent"] == 1 and link["bytes_sent"] <= size
        assert link["literal_bytes"] <= size - had + 1024 * 1024
        assert sha_tree(lab, "nas-1", "/srv/warm/pi-1/big") == sha_tree(lab, "pi-1", "/srv/hot/big")


def test_a_mirror_whose_source_was_swapped_for_an_empty_folder_deletes_nothing(lab, synced):
    from flows.sync import sync

    sync("warm-to-cloud", "lab", "ssh", **FAST)
    before = count_files(lab, "analytics-1", "/srv/datasets/edge")
    assert before > 0
    assert lab.exec("nas-1", "mv /srv/warm /srv/warm-away && mkdir /srv/warm").returncode == 0
    try:
        state = sync("warm-to-cloud", "lab", "ssh", return_state=True, **FAST)
        assert state.is_failed()
        reason = str(state.result(raise_on_failure=False))
        print("the mirror said:", reason)
        assert "/srv/warm is empty, where the last pass saw" in reason and "delete everything" in reason
        assert count_files(lab, "analytics-1", "/srv/datasets/edge") == before
    finally:
        lab.exec("nas-1", "rmdir /srv/warm && mv /srv/warm-away /srv/warm")


def test_a_mirror_deletion_over_max_delete_deletes_nothing_and_publishes_the_list(lab, synced):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sync import sync

    limit = synced.sync.jobs["warm-to-cloud"].deletion_limit
    assert lab.exec("nas-1", "mkdir -p /srv/warm/pi-3/held && for i in $(seq 1 60); do "
                             "echo $i > /srv/warm/pi-3/held/h$i.txt; done").returncode == 0
    sync("warm-to-cloud", "lab", "ssh", **FAST)
    assert count_files(lab, "analytics-1", "/srv/datasets/edge/pi-3/held") == 60
    lab.exec("nas-1", "rm -rf /srv/warm/pi-3/held")
    try:
        state = sync("warm-to-cloud", "lab", "ssh", return_state=True, **FAST)
        assert state.is_failed()
        reason = str(state.result(raise_on_failure=False))
        # rsync's count: the 60 files, and the folder too in some versions
        held = re.search(rf"would delete (\d+) files at analytics-1, more than its max_delete \({limit}\)", reason)
        assert held and int(held[1]) in (60, 61), reason
        assert count_files(lab, "analytics-1", "/srv/datasets/edge/pi-3/held") == 60, "something was deleted"
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["sync-warm-to-cloud-held-deletions"])))
        listed = str(sorted(found, key=lambda a: a.created)[-1].data)
        assert all(f"`pi-3/held/h{i}.txt`" in listed for i in range(1, 61)), listed[:2000]
    finally:
        lab.exec("analytics-1", "rm -rf /srv/datasets/edge/pi-3/held")


def test_a_bandwidth_window_of_1_mib_s_holds_within_20_percent(lab, synced, tmp_path):
    from flows.sync import sync

    data = yaml.safe_load((REPO / "inventory" / "lab.yaml").read_text())
    data["sync"]["jobs"]["warm-to-cloud"]["bandwidth"] = {"00:00": "1M"}  # one window, all day
    variant = tmp_path / "lab.yaml"
    variant.write_text(yaml.safe_dump(data))
    size = 20 * 1024 * 1024
    assert lab.exec("nas-1", f"mkdir -p /srv/warm/bandwidth && head -c {size} /dev/urandom > "
                             "/srv/warm/bandwidth/frames.bin").returncode == 0
    try:
        [link] = sync("warm-to-cloud", str(variant), "ssh", **FAST)["links"]
        rate = link["literal_bytes"] / link["transfer_seconds"]
        print(f"1 MiB/s window: {link['literal_bytes']} bytes in {link['transfer_seconds']:.1f} s = "
              f"{rate / 1024 / 1024:.3f} MiB/s")
        assert link["literal_bytes"] >= size
        assert 0.8 * 1024 * 1024 <= rate <= 1.2 * 1024 * 1024
    finally:
        lab.exec("nas-1", "rm -rf /srv/warm/bandwidth")
