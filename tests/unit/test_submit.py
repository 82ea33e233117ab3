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
