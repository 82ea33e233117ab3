"""Which worker took a flow run: read from the label Prefect's workers give each run they take (Prefect 3's process
worker records only a pid as the run's infrastructure pid, so `spark flows probe` said "on 8851", not "on nas-1")."""

from __future__ import annotations

from uuid import uuid4

from prefect.client.schemas.objects import FlowRun

from primespark.orchestration.submit import WORKER_LABEL, worker_of


def test_the_worker_is_the_runs_worker_label_not_its_pid() -> None:
    taken = FlowRun(flow_id=uuid4(), infrastructure_pid="8851",
                    labels={WORKER_LABEL: "nas-1", "prefect.work-pool.name": "spark-edge"})
    assert worker_of(taken) == "nas-1"


def test_a_run_no_worker_took_has_no_worker() -> None:
    assert worker_of(FlowRun(flow_id=uuid4())) is None
    assert worker_of(FlowRun(flow_id=uuid4(), infrastructure_pid="8851")) is None


def runs_ending(monkeypatch, *ends: tuple[str, str]) -> list[str]:
    """run_on_worker with the server's answers given: each submission gets the next end (state, message)."""
    from types import SimpleNamespace

    from primespark.orchestration import submit as module

    submitted: list[str] = []
    remaining = list(ends)

    def fake_submit(flow, deployment, parameters=None):
        submitted.append(f"run-{len(submitted) + 1}")
        return SimpleNamespace(id=uuid4(), name=submitted[-1], work_pool_name="spark-edge")

    def fake_follow(flow_run_id, deployment, said=lambda _: None, timeout=None):
        state, message = remaining.pop(0)
        return module.WorkerRun(deployment, flow_run_id, submitted[-1], "spark-edge", None, state, message)

    monkeypatch.setattr(module, "submit", fake_submit)
    monkeypatch.setattr(module, "follow", fake_follow)
    return submitted


def test_a_run_the_worker_could_not_start_is_submitted_again(monkeypatch) -> None:
    from primespark.orchestration.submit import NOT_STARTED, run_on_worker

    lost = ("Crashed", f"{NOT_STARTED}: PrefectHTTPStatusError: Server error '503 Service Unavailable'")
    submitted = runs_ending(monkeypatch, lost, ("Completed", ""))
    said: list[str] = []
    done = run_on_worker("drill", "dr-drill-nas-1", said=said.append)
    assert done.completed and done.flow_run_name == "run-2" and submitted == ["run-1", "run-2"]
    assert any("run-1 never started" in line and "submitting it again" in line for line in said)

    submitted = runs_ending(monkeypatch, lost, lost, lost, ("Completed", ""))
    assert run_on_worker("drill", "dr-drill-nas-1").state == "Crashed" and len(submitted) == 3, "3 attempts, no more"


def test_a_run_that_started_and_failed_is_not_run_again(monkeypatch) -> None:
    from primespark.orchestration.submit import run_on_worker

    for end in (("Failed", "restic: repository not found"), ("Crashed", "Flow run infrastructure exited with 137")):
        submitted = runs_ending(monkeypatch, end, ("Completed", ""))
        assert run_on_worker("backup", "backup-pi-1").state == end[0] and submitted == ["run-1"], end
