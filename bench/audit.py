"""The audit log's cost: the overhead one audited operation adds, and verifying a million records.

Run: .venv/bin/python bench/audit.py [--records 2000] [--verify 1000000] [--dir DIR]

Overhead: `--records` operations, each the whole path both hooks take (`primespark.audit.log.operation` with
the lab fleet's audit log on a local store: the chain opened before, parameters HMAC'd, the record appended
with O_APPEND + fsync under the flock, a signed checkpoint every 100 records) around an empty body; the median
and p95 per record, and the same for a bare `ChainFile.append`. Target: median < 1 ms.

Verify: a chain of `--verify` records (made in memory, written once) with a checkpoint every 1,000, checked by
`verify_chain` as `spark audit verify` does. Target: < 5 s for a million.

`--dir`: where the state directory goes (default: a temporary folder; fsync's cost depends on the disk under it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from primespark.audit.chain import GENESIS, ChainFile, encode
from primespark.audit.checkpoints import HmacSigner, append_checkpoint
from primespark.audit.log import Operation, audit_key, audit_log, operation
from primespark.audit.verify import verify_chain
from primespark.context import FleetContext
from primespark.settings import get_settings


def local_fleet(folder: Path) -> str:
    data = yaml.safe_load((get_settings().root / "inventory" / "lab.yaml").read_text())
    data["secrets"] = {"backend": "local"}
    for name, repository in data["backup"]["repositories"].items():
        repository["password"] = f"local:restic/{name}"
    path = folder / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"median {statistics.median(ordered) * 1000:.3f} ms, p95 {ordered[int(len(ordered) * 0.95)] * 1000:.3f} ms"
            f" ({len(ordered)} records)")


def overhead(folder: Path, count: int) -> None:
    os.environ["SPARK_STATE_DIR"] = str(folder / "state")
    ctx = FleetContext.load(local_fleet(folder), "local")
    log = audit_log(ctx)
    audit_key(ctx)  # made once, as on a fleet's first audited operation
    params = {"host": "pi-1", "env": "lab", "transport": "ssh", "accept_shrink": False, "token": "not-plain"}
    times = []
    for i in range(count):
        op = Operation("flow backup", ctx.env, ["pi-1"], {**params, "retries": i}, "ops@controller")
        start = time.perf_counter()
        with operation(lambda: log, op, destructive=False, warn=print):
            pass
        times.append(time.perf_counter() - start)
    print(f"audited operation: {ms(times)}")
    bare = ChainFile(folder / "bare" / "log.jsonl").open()
    times = []
    for i in range(count):
        start = time.perf_counter()
        bare.append({"operation": "flow backup", "i": i})
        times.append(time.perf_counter() - start)
    print(f"ChainFile.append:  {ms(times)}")


def verify(folder: Path, count: int) -> None:
    path = folder / "verify" / "log.jsonl"
    path.parent.mkdir(parents=True)
    signer = HmacSigner(b"bench")
    prev = GENESIS
    with path.open("wb") as out:
        for seq in range(1, count + 1):
            raw = encode(seq, prev, {"time": "2026-11-30T08:00:00.000Z", "actor": "ops@controller",
                                     "operation": "flow backup", "env": "lab", "hosts": ["pi-1"],
                                     "parameters": {"host": "pi-1", "retries": seq}, "outcome": "succeeded",
                                     "duration_seconds": 1.25, "flow_run_id": None, "deployment": None})
            out.write(raw)
            prev = json.loads(raw)["hash"]
            if seq % 1000 == 0:
                out.flush()
                append_checkpoint(path, seq, prev, "2026-11-30T08:00:00Z", signer)
    size = path.stat().st_size
    start = time.perf_counter()
    report = verify_chain(path, signer)
    took = time.perf_counter() - start
    assert report.ok and report.records == count, report.problem
    print(f"verify: {count} records ({size / 2**20:.0f} MiB, {report.checkpoints} checkpoints) in {took:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--verify", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        overhead(folder, args.records)
        verify(folder, args.verify)


if __name__ == "__main__":
    main()
