"""Prefect glue in one place: named locks, the retry predicate, in-process runs, pool and queue names, large task
arguments passed unwalked (`inputs`); and where flows run (docs/workers.md): `placement` (the fleet's
deployments and their pools, what each worker holds), `deploy` (`spark flows deploy`), `api` and `submit` (the
operator's side), `material` and `vault` (what the server's and the workers' hosts get), `wheelhouse`,
`serve_api`, `supervise` and `warmstart` (what runs on them).

Every flow has one shape: parameters → `FleetContext` → tasks that each wrap one core step (retries and
timeouts on the decorator) → publish (an artifact rendered by the core, metrics through the registry). Flows
take the locks; core code never receives a lock or a step callable.
"""
