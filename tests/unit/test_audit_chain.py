"""The audit log: a 10,000-record chain whose every kind of tampering `spark audit verify` names; secrets never
in the file; transit-signed checkpoints; destructive commands refusing without a log; one record per command."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from lab_fleets import lab_fleet
from typer.testing import CliRunner

from primespark.audit.chain import GENESIS, encode, lines, records
from primespark.audit.checkpoints import HmacSigner, TransitSigner, append_checkpoint, read_checkpoints
from primespark.audit.log import Operation, audit_key, audit_log, operation
from primespark.audit.redact import Redactor
from primespark.audit.verify import verify_chain
from primespark.cli.app import app
from primespark.cli.audit import AUDITED, resolve
from primespark.context import FleetContext
from primespark.vault_server import DevServer

REPO = Path(__file__).resolve().parents[2]
SPARK = [sys.executable, "-m", "primespark.cli.app"]
RECORDS = 10_000
EVERY = 1_000


# A 10,000-record chain with a checkpoint every 1,000 records, signed with the fleet's audit key ------------------


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return lab_fleet(tmp_path, {"backend": "local"})


def body(i: int) -> dict[str, Any]:
    return {"time": f"2026-11-30T08:{i // 600 % 60:02d}:{i // 10 % 60:02d}.000Z", "actor": "ops@controller",
            "operation": "flow backup", "env": "lab", "hosts": [f"pi-{i % 3 + 1}"], "parameters": {"host": "pi-1"},
            "outcome": "succeeded", "duration_seconds": 1.5, "flow_run_id": None, "deployment": None}


_BUILT: dict[str, tuple[bytes, list[tuple[int, str]]]] = {}


def built_chain() -> tuple[bytes, list[tuple[int, str]]]:
    """The chain's bytes and (count, head) every EVERY records: made once, copied into each test."""
    if "chain" not in _BUILT:
        out, heads, prev = [], [], GENESIS
        for seq in range(1, RECORDS + 1):
            raw = encode(seq, prev, body(seq))
            out.append(raw)
            prev = json.loads(raw)["hash"]
            if seq % EVERY == 0:
                heads.append((seq, prev))
        _BUILT["chain"] = (b"".join(out), heads)
    return _BUILT["chain"]


@pytest.fixture
def chain(fleet: str) -> Path:
    ctx = FleetContext.load(fleet, "local")
    raw, heads = built_chain()
    path = ctx.state_dir / "audit" / "log.jsonl"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(raw)
    signer = HmacSigner(audit_key(ctx))
    for count, head in heads:
        append_checkpoint(path, count, head, "2026-11-30T09:00:00Z", signer)
    return path


def verify_cli(fleet: str) -> tuple[int, str]:
    """The exit code and what `spark audit verify` said, its lines unwrapped (a deep temporary folder's path
    makes the console wrap a message anywhere)."""
    done = CliRunner().invoke(app, ["audit", "verify", "--env", fleet], env={"COLUMNS": "200"})
    return done.exit_code, " ".join(done.output.split())


def rewrite(path: Path, change: Any) -> None:
    kept = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(change(kept)))


def test_the_untouched_chain_verifies(fleet: str, chain: Path) -> None:
    code, said = verify_cli(fleet)
    assert code == 0, said
    assert "10000" in said and "ok" in said and "hmac-sha256" in said


def test_an_edited_record_is_named(fleet: str, chain: Path) -> None:
    rewrite(chain, lambda ls: [*ls[:4999], ls[4999].replace(b'"succeeded"', b'"failed"'), *ls[5000:]])
    code, said = verify_cli(fleet)
    assert code == 1
    assert "line 5000 was edited" in said, said


def test_a_record_rewritten_with_a_fresh_hash_is_named(fleet: str, chain: Path) -> None:
    def forge(ls: list[bytes]) -> list[bytes]:
        old = json.loads(ls[4321])
        fake = {k: v for k, v in old.items() if k not in ("seq", "prev", "hash")} | {"outcome": "failed"}
        return [*ls[:4321], encode(old["seq"], old["prev"], fake), *ls[4322:]]

    rewrite(chain, forge)
    code, said = verify_cli(fleet)
    assert code == 1
    assert "record 4322 (line 4322) was edited" in said, said


def test_an_inserted_record_is_named(fleet: str, chain: Path) -> None:
    def insert(ls: list[bytes]) -> list[bytes]:
        # a forger who knows the format: the next number, linked to the record before it
        before = json.loads(ls[2499])
        return [*ls[:2500], encode(2501, before["hash"], body(99)), *ls[2500:]]

    rewrite(chain, insert)
    code, said = verify_cli(fleet)
    assert code == 1
    assert "line 2501 was inserted" in said, said


def test_two_swapped_records_are_named(fleet: str, chain: Path) -> None:
    rewrite(chain, lambda ls: [*ls[:2999], ls[3000], ls[2999], *ls[3001:]])
    code, said = verify_cli(fleet)
    assert code == 1
    assert "lines 3000 and 3001 are out of order" in said, said


def test_a_deleted_record_is_named(fleet: str, chain: Path) -> None:
    rewrite(chain, lambda ls: [*ls[:6999], *ls[7000:]])
    code, said = verify_cli(fleet)
    assert code == 1
    assert "record 7000 deleted" in said, said


def test_a_tail_truncated_past_the_last_checkpoint_is_named(fleet: str, chain: Path) -> None:
    rewrite(chain, lambda ls: ls[:9_990])
    code, said = verify_cli(fleet)
    assert code == 1
    assert "truncated" in said and "counts 10000 records, the chain holds 9990" in said, said


def test_a_tail_cut_inside_a_record_is_named(fleet: str, chain: Path) -> None:
    with chain.open("r+b") as handle:
        handle.truncate(chain.stat().st_size - 40)
    code, said = verify_cli(fleet)
    assert code == 1
    assert "line 10000 is a partial record" in said, said


def test_an_edited_checkpoint_is_named(fleet: str, chain: Path) -> None:
    points = chain.with_name("log.checkpoints.jsonl")
    rewrite(points, lambda ls: [*ls[:9], ls[9].replace(b'"count": 10000', b'"count": 9990')])
    code, said = verify_cli(fleet)
    assert code == 1
    assert "checkpoint 10" in said and "does not verify" in said, said


# Writers -------------------------------------------------------------------------------------------------------


WRITER = """
import sys
from pathlib import Path
from primespark.audit.chain import ChainFile
chain = ChainFile(Path(sys.argv[1])).open()
for i in range(int(sys.argv[2])):
    chain.append({"writer": sys.argv[3], "i": i})
"""


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "log.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), "300", name]) for name in "ab"]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    report = verify_chain(path, None)
    assert report.ok and report.records == 600, report.problem
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "audit").stat().st_mode & 0o777 == 0o700
    assert sorted(r["writer"] for r in records(path)).count("a") == 300


def test_a_chain_written_by_the_log_checkpoints_and_verifies(fleet: str) -> None:
    ctx = FleetContext.load(fleet, "local")
    log = audit_log(ctx)
    log.checkpoint_every = 4
    for i in range(10):
        op = Operation("flow probe", ctx.env, ["pi-1"], {"site": "edge", "i": i}, "ops@here")
        with operation(lambda: log, op, destructive=False, warn=pytest.fail):
            pass
    assert [p.count for p in read_checkpoints(log.chain)] == [4, 8]
    assert verify_chain(log.chain, HmacSigner(audit_key(ctx))).ok
    assert [line.seq for line in lines(log.chain)] == list(range(1, 11))


def test_the_checkpoint_interval_is_the_fleets_unless_the_machine_sets_one(fleet: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from primespark.settings import get_settings

    assert audit_log(FleetContext.load(fleet, "local")).checkpoint_every == 1, "the lab fleet's audit setting"
    monkeypatch.setenv("SPARK_AUDIT_CHECKPOINT_EVERY", "7")
    get_settings.cache_clear()
    try:
        assert audit_log(FleetContext.load(fleet, "local")).checkpoint_every == 7
    finally:
        monkeypatch.delenv("SPARK_AUDIT_CHECKPOINT_EVERY")
        get_settings.cache_clear()


def test_a_checkpoint_the_signer_cannot_sign_is_a_warning_and_the_next_record_covers_it(fleet: str) -> None:
    ctx = FleetContext.load(fleet, "local")
    log = audit_log(ctx)
    log.checkpoint_every = 1
    working = log.signer

    def down() -> Any:
        raise OSError("Connection refused")

    log.signer = down
    warned: list[str] = []
    with operation(lambda: log, Operation("lab down", ctx.env, [], {}, "ops@here"), False, warned.append):
        pass
    assert read_checkpoints(log.chain) == []
    assert any("checkpoint of record 1 not signed (Connection refused)" in w and "will cover it" in w
               for w in [*warned, *log.warnings]), (warned, log.warnings)
    # `spark lab down` stops the lab's OpenBao, the signer, itself: what it then cannot sign waits, unsaid
    with operation(lambda: log, Operation("lab down", ctx.env, [], {}, "ops@here"), False, pytest.fail,
                   stops_signer=True):
        pass
    assert read_checkpoints(log.chain) == []
    log.signer = working
    with operation(lambda: log, Operation("lab up", ctx.env, [], {}, "ops@here"), False, pytest.fail):
        pass
    assert [p.count for p in read_checkpoints(log.chain)] == [3]
    assert verify_chain(log.chain, HmacSigner(audit_key(ctx))).ok


# No secret in the file -----------------------------------------------------------------------------------------


def test_no_secret_value_reaches_the_file(fleet: str, vault: DevServer) -> None:
    from primespark.backup.repositories import password
    from primespark.orchestration.material import auth_string

    ctx = FleetContext.load(fleet, "local")
    restic = password(ctx, "nas-primary", create=True)
    wireguard = base64.b64encode(X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())).decode()
    token = vault.client().auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    prefect = auth_string(ctx)
    made = {"restic password": restic, "WireGuard key": wireguard, "Vault token": token, "Prefect auth": prefect}
    assert all(len(v) >= 16 for v in made.values())
    parameters = {
        "password": restic, "private_key": wireguard, "vault_token": token, "auth_string": prefect,
        # under names that otherwise hold plain values, and nested: caught by their shape
        "host": wireguard, "job": token, "env": f"https://{prefect}@prefect.example/api",
        "options": {"hosts": [wireguard], "notes": restic},
    }
    log = audit_log(ctx)
    op = Operation("spark test", ctx.env, ["pi-1"], parameters, "ops@here")
    with pytest.raises(RuntimeError), operation(lambda: log, op, destructive=False, warn=pytest.fail):
        raise RuntimeError(f"failed with {wireguard} and token {token}")
    text = log.chain.read_bytes()
    for what, value in made.items():
        assert value.encode() not in text, f"the {what} is in the audit file"
    record = next(records(log.chain))
    assert record["parameters"]["password"].startswith("hmac-sha256:")
    assert record["parameters"]["password"] == record["parameters"]["options"]["notes"]  # same value, same HMAC
    assert record["outcome"] == "failed" and "hmac-sha256:" in record["error"]


@pytest.mark.parametrize("fails", [False, True], ids=["succeeded", "failed"])
def test_values_redacted_without_a_key_are_recorded_and_warned_of_only_when_nothing_else_is_said(
        fleet: str, fails: bool) -> None:
    """Fail closed: no key, no value written (the record is, saying why). An operation that failed says why itself:
    a warning before its error would bury it."""
    from primespark.audit.log import AuditLog
    from primespark.audit.redact import UNAVAILABLE, Redactor
    from primespark.errors import UserError
    from primespark.secrets import SecretStoreUnreachable

    ctx = FleetContext.load(fleet, "local")

    def no_key() -> bytes:
        raise SecretStoreUnreachable("secret store unreachable: no answer from Vault at http://127.0.0.1:1")

    log = AuditLog(ctx.state_dir / "audit", Redactor(no_key), lambda: HmacSigner(no_key()))
    op = Operation("spark tls renew", ctx.env, ["pi-1"], {"host": "pi-1", "folder": "/etc/tls"}, "ops@here")
    warned: list[str] = []
    with pytest.raises(UserError) if fails else contextlib.nullcontext(), \
            operation(lambda: log, op, destructive=False, warn=warned.append):
        if fails:
            raise SecretStoreUnreachable("no answer from Vault while renewing pi-1's certificate")
    (record,) = records(log.chain)
    assert record["parameters"] == {"host": "pi-1", "folder": UNAVAILABLE}
    assert record["hmac_key"] == "unavailable: SecretStoreUnreachable: secret store unreachable: no answer from " \
                                 "Vault at http://127.0.0.1:1"
    assert record["outcome"] == ("failed" if fails else "succeeded")
    assert warned == ([] if fails else [f"audit: secret values redacted without an HMAC: {record['hmac_key'][13:]}"])


# Checkpoints signed by Vault's transit engine ------------------------------------------------------------------


def test_transit_signed_checkpoints_and_a_tampered_one(fresh_vault: DevServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VAULT_TOKEN", fresh_vault.root_token)
    fleet = lab_fleet(tmp_path, {"backend": "vault", "address": fresh_vault.address, "auth": "token"})
    ctx = FleetContext.load(fleet, "local")
    log = audit_log(ctx)
    log.checkpoint_every = 3
    for i in range(7):
        with operation(lambda: log, Operation("flow backup", ctx.env, ["pi-1"], {"i": i}, "ops@here"), False,
                       pytest.fail):
            pass
    points = read_checkpoints(log.chain)
    assert [(p.count, p.signer) for p in points] == [(3, "transit:transit/primespark-audit-lab")] * 1 + \
        [(6, "transit:transit/primespark-audit-lab")]
    assert all(p.signature.startswith("vault:v1:") for p in points)
    code, said = verify_cli(fleet)
    assert code == 0, said

    # the writer's policy signs, and cannot take the key out
    client = fresh_vault.client()
    client.sys.create_or_update_acl_policy(name="primespark-audit", policy=(REPO / "policies/vault/audit.hcl")
                                           .read_text())
    writer = fresh_vault.client(client.auth.token.create(policies=["primespark-audit"], ttl="10m")
                                ["auth"]["client_token"])
    signer = TransitSigner(writer, "primespark-audit-lab")
    assert signer.verify(b"payload", signer.sign(b"payload"))
    assert writer.secrets.transit.read_key(name="primespark-audit-lab")["data"]["exportable"] is False
    import hvac.exceptions

    with pytest.raises((hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest)):
        writer.secrets.transit.export_key(name="primespark-audit-lab", key_type="signing-key")

    rewrite(log.chain.with_name("log.checkpoints.jsonl"),
            lambda ls: [ls[0], ls[1].replace(points[1].head.encode(), points[0].head.encode())])
    code, said = verify_cli(fleet)
    assert code == 1
    assert "checkpoint 2" in said and "does not verify with transit:transit/primespark-audit-lab" in said, said


def test_two_writers_making_the_transit_key_at_once_both_succeed(fresh_vault: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The second of two writers that both saw no transit engine (the lab's two workers set up at once) finds it
    enabled by the first: it goes on, with the first's key; an engine of another type there still fails."""
    from primespark.errors import UserError

    client = fresh_vault.client()
    first = TransitSigner(client, "primespark-audit-race", mount="race")
    client.sys.enable_secrets_engine("transit", path="race")  # the first writer is this far: no key yet
    def listed_before_the_first_enabled_it(signer: TransitSigner) -> None:
        real = signer.client.sys.list_mounted_secrets_engines
        answers = iter([{"data": {}}])
        monkeypatch.setattr(signer.client.sys, "list_mounted_secrets_engines", lambda: next(answers, None) or real())

    second = TransitSigner(fresh_vault.client(), "primespark-audit-race", mount="race")
    listed_before_the_first_enabled_it(second)
    second.ensure_key()
    signature = second.sign(b"payload")
    first.ensure_key()  # and makes the key that the second made meanwhile: the same key
    assert first.verify(b"payload", signature)

    client.sys.enable_secrets_engine("kv", path="not-transit")
    third = TransitSigner(fresh_vault.client(), "primespark-audit-race", mount="not-transit")
    listed_before_the_first_enabled_it(third)
    with pytest.raises(UserError, match="enabling the transit engine"):
        third.ensure_key()


# The hooks -----------------------------------------------------------------------------------------------------


def spark(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPARK_STATE_DIR": str(state), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([*SPARK, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=180,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def blocked(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local-store fleet whose audit log cannot be written (its file is a folder: even root cannot append)."""
    fleet = lab_fleet(tmp_path, {"backend": "local"})
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "audit" / "log.jsonl").mkdir(parents=True)
    yield fleet, state


def test_a_changing_command_warns_and_runs_without_a_log(blocked: tuple[str, Path]) -> None:
    fleet, state = blocked
    done = spark("mesh", "plan", "--env", fleet, state=state)
    assert done.returncode == 0, done.stderr
    assert "no audit record was written" in done.stderr and "cannot be written" in done.stderr
    assert list((state / "mesh").iterdir()), "the plan was not saved"


@pytest.mark.parametrize("command", [["mesh", "rotate", "pi-1"], ["backup", "init", "nas-primary"],
                                     ["destroy", "--yes"], ["sync", "run", "--accept-empty-source"]],
                         ids=lambda c: " ".join(c))
def test_a_destructive_command_refuses_without_a_log(blocked: tuple[str, Path], command: list[str]) -> None:
    fleet, state = blocked
    before = sorted(p.relative_to(state) for p in state.rglob("*"))
    done = spark(*command, "--env", fleet, state=state)
    assert done.returncode == 1, done.stdout + done.stderr
    path = next(p for p in AUDITED if list(p) == command[:len(p)])
    assert f"refusing `spark {' '.join(path)}`" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.relative_to(state) for p in state.rglob("*")) == before  # nothing else happened


def test_the_cli_hook_writes_one_record_per_changing_command(fleet: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    chain = state / "audit" / "log.jsonl"
    assert spark("mesh", "plan", "--env", fleet, state=state).returncode == 0
    assert spark("mesh", "show", "--env", fleet, state=state).returncode == 0  # reads: no record
    assert spark("validate", "--env", fleet, state=state).returncode == 0
    assert spark("mesh", "plan", "--env", fleet, "--mesh", "nope", state=state).returncode == 1
    found = list(records(chain))
    assert [(r["operation"], r["outcome"]) for r in found] == [("spark mesh plan", "succeeded"),
                                                               ("spark mesh plan", "failed")]
    assert found[0]["env"] == "lab" and "pi-1" in found[0]["hosts"] and found[0]["actor"].count("@") == 1
    assert "nope" in found[1]["error"]
    shown = spark("audit", "show", "--env", fleet, "--operation", "mesh", "--since", "1h", state=state)
    assert shown.returncode == 0 and shown.stdout.count("spark mesh plan") == 2, shown.stdout
    assert "spark mesh plan" not in spark("audit", "show", "--env", fleet, "--host", "no-such-host",
                                          state=state).stdout


def test_a_chain_cut_inside_its_last_record_stops_a_destructive_operation(fleet: str) -> None:
    from primespark.audit.log import AuditUnavailable

    ctx = FleetContext.load(fleet, "local")
    log = audit_log(ctx)
    op = Operation("spark mesh rotate", ctx.env, ["pi-1"], {"host": "pi-1"}, "ops@here")
    with operation(lambda: log, op, destructive=True, warn=pytest.fail):
        pass
    with log.chain.open("r+b") as handle:
        handle.truncate(log.chain.stat().st_size - 90)  # a crash in the middle of writing a record
    ran = []
    with pytest.raises(AuditUnavailable, match="cannot be continued"), operation(lambda: log, op, True, pytest.fail):
        ran.append(op)
    assert not ran


def test_every_audited_path_is_a_command() -> None:
    for path in AUDITED:
        found = resolve([*path, "--env", "lab"])
        assert found is not None and found[0] == path, path


def test_the_flow_hook_records_each_run_and_refuses_a_destructive_one(fleet: str) -> None:
    from primespark.audit.log import AuditUnavailable
    from primespark.orchestration import auditing

    calls = []

    @auditing.audited(auditing.sync_links, destructive=auditing.mirror_past_guard)
    def sync(job: str, env: str = "lab", dry_run: bool = False, accept_empty_source: bool = False) -> str:
        calls.append(job)
        return "done"

    assert sync("hot-to-nas", env=fleet) == "done"
    ctx = FleetContext.load(fleet, "local")
    chain = ctx.state_dir / "audit" / "log.jsonl"
    (record,) = records(chain)
    assert record["operation"] == "flow sync" and record["outcome"] == "succeeded"
    assert set(record["hosts"]) >= {"nas-1"} and record["parameters"]["job"] == "hot-to-nas"
    shutil.rmtree(chain.parent)
    chain.mkdir(parents=True)  # unwritable
    with pytest.raises(AuditUnavailable, match="refusing `flow sync`"):
        sync("hot-to-nas", env=fleet, accept_empty_source=True)
    assert sync("hot-to-nas", env=fleet, accept_empty_source=True, dry_run=True) == "done"  # a dry run deletes nothing
    assert calls == ["hot-to-nas", "hot-to-nas"]


@pytest.mark.slow
def test_a_prefect_flow_run_records_its_run_id(fleet: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.probe import probe

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        state = probe("edge", env=fleet, transport="local", reach=False, return_state=True)
    assert state.is_completed(), state
    ctx = FleetContext.load(fleet, "local")
    (record,) = records(ctx.state_dir / "audit" / "log.jsonl")
    assert record["operation"] == "flow probe" and record["outcome"] == "succeeded"
    assert record["flow_run_id"] == str(state.state_details.flow_run_id)
    assert record["parameters"] == {"site": "edge", "env": fleet, "transport": "local", "reach": False}
    assert "nas-1" in record["hosts"] and record["deployment"] is None


class HomePerHost:
    """Each host of the fleet a folder of this machine, where its copies go (SPARK_AUDIT_COPIES)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def runner(self, host: str) -> Any:
        from primespark.hosts import LocalRunner

        (self.root / host).mkdir(parents=True, exist_ok=True)
        return LocalRunner(host, prefix=["env", f"SPARK_AUDIT_COPIES={self.root / host}"])


def test_checkpoints_copied_off_the_machine_catch_them_cut_or_edited_here(fleet: str, chain: Path,
                                                                          tmp_path: Path) -> None:
    from primespark.audit.offsite import compare, fetch, offsite_hosts, ship
    from primespark.errors import UserError

    ctx = FleetContext.load(fleet, "local")
    hosts = HomePerHost(tmp_path / "hosts")
    targets = offsite_hosts(ctx.fleet)
    assert targets == ["nas-1", "ops-1"]  # the NAS (the primary repository's host) and the cloud worker
    points = chain.with_name("log.checkpoints.jsonl")
    here = points.read_bytes()
    assert [ship(hosts, h, "lab", here) for h in targets] == [len(here)] * 2
    assert [ship(hosts, h, "lab", here) for h in targets] == [0, 0]  # nothing new: nothing added
    copy = tmp_path / "hosts" / "nas-1" / "lab"
    assert next(copy.rglob("log.checkpoints.jsonl")).stat().st_mode & 0o777 == 0o600

    # root here cuts the chain and its last checkpoint together: the local verify cannot tell, the copies can
    rewrite(chain, lambda ls: ls[:9_990])
    rewrite(points, lambda ls: ls[:9])
    assert verify_cli(fleet)[0] == 0
    difference = compare("nas-1", points.read_bytes(), fetch(hosts, "nas-1", "lab"))
    assert difference is not None and "the copy on nas-1 holds 10 checkpoints, this machine 9" in difference.message
    with pytest.raises(UserError, match="not the ones already copied to nas-1"):
        ship(hosts, "nas-1", "lab", points.read_bytes())

    rewrite(points, lambda ls: [*ls[:4], ls[4].replace(b'"count": 5000', b'"count": 5001'), *ls[5:9]])
    difference = compare("ops-1", points.read_bytes(), fetch(hosts, "ops-1", "lab"))
    assert difference is not None and difference.message.startswith("checkpoint 5 differs from its copy on ops-1")


def test_each_workers_checkpoints_are_relayed_to_the_other_hosts_and_an_edit_there_is_named(
        fleet: str, chain: Path, tmp_path: Path) -> None:
    from primespark.audit.offsite import relay_workers, worker_differences
    from primespark.errors import UserError
    from primespark.orchestration.material import worker_state_dir

    ctx = FleetContext.load(fleet, "local")
    hosts = HomePerHost(tmp_path / "hosts")
    points = chain.with_name("log.checkpoints.jsonl").read_bytes().splitlines(keepends=True)
    own = {"nas-1": b"".join(points[:4]), "ops-1": b"".join(points[4:7])}  # each worker's own file
    for worker, data in own.items():
        folder = Path(worker_state_dir(ctx, worker)) / "audit"
        folder.mkdir(parents=True)
        (folder / "log.checkpoints.jsonl").write_bytes(data)
    # the edge worker's to the cloud worker, and the other way round: never only to its own machine
    assert relay_workers(ctx, hosts) == [("nas-1", "ops-1", len(own["nas-1"])), ("ops-1", "nas-1", len(own["ops-1"]))]
    relayed = tmp_path / "hosts" / "ops-1" / "lab" / "worker-nas-1" / "log.checkpoints.jsonl"
    assert relayed.read_bytes() == own["nas-1"]
    assert worker_differences(ctx, hosts) == []
    assert [added for *_, added in relay_workers(ctx, hosts)] == [0, 0]

    # root on nas-1 edits its worker's second checkpoint: the copy on ops-1 names it, and no new copy is taken
    edited = Path(worker_state_dir(ctx, "nas-1")) / "audit" / "log.checkpoints.jsonl"
    lines = own["nas-1"].splitlines(keepends=True)
    edited.write_bytes(lines[0] + lines[1].replace(b'"count": 2000', b'"count": 2001') + b"".join(lines[2:]))
    [difference] = worker_differences(ctx, hosts)
    assert difference.host == "ops-1"
    assert difference.message.startswith("nas-1's worker: checkpoint 2 differs from its copy on ops-1")
    with pytest.raises(UserError, match="not the ones already copied to ops-1"):
        relay_workers(ctx, hosts)


@pytest.mark.parametrize("first", ["+", "/", "A", "9"])
def test_a_wireguard_key_in_free_text_is_redacted_whatever_its_first_character(first: str) -> None:
    """A base64 key may begin with + or / (one key in 32): no word boundary stands before it after a space."""
    key = first + "+Obyw9kF30RzPwxFNZquZEOECGnjzx/CKXkWf6V3u30="[1:]  # the key that leaked in a CI run
    text = Redactor(lambda: b"k" * 32).text(f"failed with {key} (and {key})")
    assert key not in text and text.count("hmac-sha256:") == 2, text
